"""The plan: the document run and bench execute, the cost model, rates fitted from a profile,
the memory model, predictions and the solver. Pure Python: no torch anywhere in this package.

May import: `core`, `models.shapes`, `profile.document`.
"""
