"""Loading models: `--model` resolution (source: ModelRef, resolve_model), stock transformers
models and tokenizers (loader: LoadedModel, the one loaded-model holder), quantized folders on
the CPU (quantized_loader), models built on meta and filled tensor by tensor (meta).

May import: `core`, `models.shapes`, `models.formats`.
"""
