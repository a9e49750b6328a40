"""Models: shapes from config and safetensors headers, presets, `--model` resolution, GGUF
conversion, synthetic checkpoints, loading stock transformers models.

May import: `core` only.
"""
