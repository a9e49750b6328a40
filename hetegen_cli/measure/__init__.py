"""Measuring this machine for the profile (`hetegen profile`): the measuring toolbox, the CPU
and GPU measurements, the engine's fixed costs (through the engine itself), and
load-or-measure for plan, run and bench.

May import: `core`, `models`, `profile`, `plan`, `engine` (never `run`).
"""
