"""The hardware profile: its document (schema, load, save), the measuring toolbox, the CPU
and GPU measurements, and load-or-measure for plan, run and bench.

May import: `core` only (never `models`); `document` is pure Python (no torch).
"""
