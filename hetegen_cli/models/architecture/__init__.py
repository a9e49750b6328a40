"""What transformers knows of a model type: its causal LM built on the meta device, and the
shapes hetegen plans with derived from it (derive), cached by config (no per-architecture
tables). Sits between models.shapes (pure data) and models.formats."""
