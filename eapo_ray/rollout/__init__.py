"""Rollout: the EAPO episode protocol, generation engines, and the rollout actor."""
