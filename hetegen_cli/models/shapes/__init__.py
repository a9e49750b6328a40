"""Model shapes, the only part of `models` the planner reads: config.json validation
(config), safetensors headers (headers), ModelSpec (spec), presets, the quantization document
(quantfile) and the local folder check (folder).

Pure Python, no torch. May import: `core` only.
"""
