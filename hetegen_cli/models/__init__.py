"""Models, in three parts, each importing only the ones before it:

- `shapes`: config.json, safetensors headers, ModelSpec, presets (pure Python; all the
  planner reads);
- `formats`: files and conversions: safetensors tensors, quantized weights and folders, GGUF,
  synthetic checkpoints, transformers compatibility;
- `loading`: `--model` resolution and the models ready to generate.

May import: `core` only.
"""
