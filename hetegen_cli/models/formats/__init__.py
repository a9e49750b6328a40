"""Model files and conversions: safetensors tensors read in chunks (checkpoint), quantized
weights and their kernels (quant), quantized model folders (quantized), routed experts read
one by one and computed quantized on the CPU (quant_experts), GGUF files read (gguf_read,
gguf_types, gguf_config), converted once (gguf, gguf_quant) and written (gguf_write,
gguf_write_moe), synthetic checkpoints (synthetic), and hetegen's terms with transformers
(compat).

May import: `core`, `models.shapes`.
"""
