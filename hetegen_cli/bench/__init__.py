"""`hetegen bench`: preparing a benchmark, the arms (strategies), timing, the runner, the
report and the greedy-token check.

May import: `core`, `models`, `profile`, `plan`, `engine`, `run`.
"""
