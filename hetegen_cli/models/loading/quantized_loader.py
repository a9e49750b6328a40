"""Quantized model folders (models.formats.quantized's layout) loaded onto the CPU.

`load_quantized(ref)` builds the stock transformers model on meta and fills it: QuantLinear
modules for the quantized linears, a QuantExperts module for each MoE layer's routed experts
(models.formats.quant_experts: the quantized kernels per expert), the rest (CPU) in the
kernels' activation dtype, and the LM head quantized to int8 at load (`quantize_head`: it is
stored bfloat16, often tied to the embedding; the engine holds a quantized model's head the
same way).

The activation dtype is `activation_dtype()`: float32 where hetegen's CPU kernels are in use
(they take float32, so no linear converts its input and output: 1.2x decode on OLMoE-1B-7B,
docs/quant.md), bfloat16 with torch's packed kernels. The stored bfloat16 tensors are exact in
float32; the token embedding alone stays bfloat16 (it is as large as the vocabulary) and its
rows are converted as they are looked up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.core import quant
from hetegen_cli.core.console import activity, progress
from hetegen_cli.core.devices import dtype_name
from hetegen_cli.core.dtypes import ComputeFormats
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats import cpu_kernels, decode_steps, fused
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantLinear, quantize
from hetegen_cli.models.formats.quant_experts import load_quant_experts
from hetegen_cli.models.formats.quantized import read_quant_weight
from hetegen_cli.models.loading import meta
from hetegen_cli.models.loading.cache import new_cache
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.shapes.quantfile import linear_formats, quant_label, read_quantization


def fuse_for_decode(model: Any) -> fused.Fusions:
    """One kernel call per MLP and norm at a decode step where hetegen's kernels compute what
    the module does (models.formats.fused), then one per attention, one Python call per
    decoder layer and a step for the whole model (models.formats.decode_steps), checked on a
    cache like the one `run.generate` gives them."""
    parts = fused.fuse_model(model)
    return parts + decode_steps.fuse_steps(model, lambda: new_cache(model, 8))


def quantize_head(model: Any, group: int = quant.DEFAULT_GROUP_SIZE) -> QuantLinear | None:
    """Hold the LM head of a quantized model on the CPU as int8 (quant.HEAD_FORMAT), quantized
    at load from its bfloat16 weight; a tied embedding keeps its bfloat16 rows for the lookup.
    Measured on the default model (docs/quant.md): +0.14 % perplexity, ~1.2x decode; int4
    cost +5 %. The head may be an nn.Linear or any module holding a float `weight` [out, in]
    and `bias` (the engine's all-CPU CpuLinear). None (the head unchanged) when the kernel
    does not take its shape."""
    head = model.get_output_embeddings()
    fmt = quant.HEAD_FORMAT
    weight = getattr(head, "weight", None)
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 2
        or not weight.is_floating_point()
        or not quant.kernel_takes(fmt, *weight.shape)
    ):
        return None
    q = QuantLinear(quantize(weight.detach(), fmt, group), getattr(head, "bias", None))
    model.set_output_embeddings(q)
    model.config.tie_word_embeddings = False  # nothing may tie the embedding back onto it
    return q


def activation_dtype() -> torch.dtype:
    """The dtype a plain quantized model computes its activations in (module docstring)."""
    return torch.float32 if cpu_kernels.kernels() is not None else torch.bfloat16


def _embedding_in_bfloat16(model: Any, dtype: torch.dtype) -> None:
    """Hold the token embedding (untied by quantize_head, or never tied) as stored, bfloat16,
    and give its rows to the model in `dtype`. A head still tied to it keeps `dtype`."""
    embedding = model.get_input_embeddings()
    if embedding is None or embedding.weight is getattr(model.get_output_embeddings(), "weight", None):
        return
    embedding.to(torch.bfloat16)
    embedding.register_forward_hook(lambda _module, _args, out: out.to(dtype))


def load_quantized(ref: Any) -> LoadedModel:
    """A quantized folder as a stock transformers model on the CPU: QuantLinear for each
    quantized linear, `activation_dtype()` for everything else but the token embedding."""
    folder = Path(ref.path)
    doc = read_quantization(folder)
    if doc is None:
        raise ModelError(f"{folder} is not a quantized model folder", "run `hetegen quantize` first")
    start = time.perf_counter()
    dtype = activation_dtype()
    model = meta.meta_model(folder, dtype)
    quantized = set(doc["linears"])
    tied = meta.tied_head(model)
    cpu = torch.device("cpu")
    with (
        CheckpointReader(folder, getattr(model, "base_model_prefix", "model")) as reader,
        activity(f"loading {ref.name} ({quant_label(doc)})"),
        progress(True) as bar,
    ):
        task = bar.add_task(f"Loading {ref.name}", total=len(list(meta.named_tensors(model))))
        for name in quantized:
            linear = model.get_submodule(name)
            bias = None
            if linear.bias is not None:
                bias = reader.read(reader.key_for(f"{name}.bias"), dtype, cpu)
            meta.set_module(model, name, QuantLinear(read_quant_weight(reader, name, doc), bias))
        for x in ref.spec.experts:  # stored one by one (quantized or bfloat16), never fused
            act_fn = model.get_submodule(x.name).act_fn
            meta.set_module(model, x.name, load_quant_experts(reader, x, act_fn, dtype))
        meta.load_rest(model, reader, cpu, dtype, tied, bar, task)  # the rest, as the engine does
    meta.make_buffers(model, torch.device("cpu"))
    meta.check_no_meta(model)
    quantize_head(model)  # the LM head read as int8 every token
    fusions = None
    if dtype != torch.bfloat16:
        _embedding_in_bfloat16(model, dtype)
        fusions = fuse_for_decode(model)
    model.eval()
    meta.load_generation_config(model, folder)
    quant_formats = sorted({fmt for fmt, _ in linear_formats(doc).values()})  # mixed: int4, int8
    return LoadedModel(
        model=model,
        device="cpu",
        formats=ComputeFormats(dtype_name(dtype), quant="+".join(quant_formats)),
        load_s=time.perf_counter() - start,
        folder=str(folder),
        fused=None if fusions is None else fusions.as_dict(),
    )
