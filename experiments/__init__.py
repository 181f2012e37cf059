"""Repository tooling that runs the library end to end (not part of the installed package):
`python -m experiments.paper_table` (the paper's table) and `python -m experiments.distill`."""
