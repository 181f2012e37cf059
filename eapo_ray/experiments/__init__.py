"""Experiments on top of the launcher: the paper's table (`paper_table`) and the
distillation baseline it needs (`distill`)."""
