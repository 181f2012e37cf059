"""EAPO's math: schedules, advantages, losses, batch filters. Pure torch/Python, no Ray."""
