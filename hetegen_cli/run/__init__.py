"""Running a model: what the user asked (setup: what to load, what to generate), how the
model is built (builders: plain or through the engine, from a plan or planned on the fly),
executing a run, and the generation loop.

May import: `core`, `models`, `profile`, `plan`, `engine`, `measure`.
"""
