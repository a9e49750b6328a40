"""The heterogeneous engine: host weights, checkpoint reading, the prefetch scheduler, the
split linear and the model loader that swaps them into a stock transformers model.

May import: `core`, `models`, `plan.document` and `plan.memory` (never the solver).
"""
