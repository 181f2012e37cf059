"""The driver of a run, one module per part: `system` (start-up and teardown of the parts),
`loop` (the training loop), `evaluation` (held-out evaluation beside it), `checkpoints` (the
run directory, checkpoints and resume), `recovery` (learner rebuilds), `breakdown` (where the
time went), `summary` (summary.json) and `run` (one launch top to bottom). The command line is
eapo_ray/launch.py."""
