"""Quantized model folders (models.formats.quantized's layout) loaded onto the CPU.

`load_quantized(ref)` builds the stock transformers model on meta and fills it: QuantLinear
modules for the quantized linears, a QuantExperts module for each MoE layer's routed experts
(models.formats.quant_experts: the packed kernels per expert), bfloat16 tensors for the rest
(CPU), and the LM head
quantized to int8 at load (`quantize_head`: it is stored bfloat16, often tied to the
embedding; the engine holds a quantized model's head the same way).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.core import quant
from hetegen_cli.core.console import activity, progress
from hetegen_cli.core.dtypes import ComputeFormats
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantLinear, quantize
from hetegen_cli.models.formats.quant_experts import load_quant_experts
from hetegen_cli.models.formats.quantized import read_quant_weight
from hetegen_cli.models.loading import meta
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.shapes.quantfile import REST_DTYPE, linear_formats, quant_label, read_quantization


def quantize_head(model: Any, group: int = quant.DEFAULT_GROUP_SIZE) -> QuantLinear | None:
    """Hold the LM head of a quantized model on the CPU as int8 (quant.HEAD_FORMAT), quantized
    at load from its bfloat16 weight; a tied embedding keeps its bfloat16 rows for the lookup.
    Measured on the default model (docs/quant.md): +0.14 % perplexity, ~1.2x decode; int4
    cost +5 %. None (the head unchanged) when the kernel does not take its shape."""
    head = model.get_output_embeddings()
    fmt = quant.HEAD_FORMAT
    if not isinstance(head, torch.nn.Linear) or not quant.kernel_takes(
        fmt, head.out_features, head.in_features
    ):
        return None
    q = QuantLinear(quantize(head.weight.detach(), fmt, group), head.bias)
    model.set_output_embeddings(q)
    model.config.tie_word_embeddings = False  # nothing may tie the embedding back onto it
    return q


def load_quantized(ref: Any) -> LoadedModel:
    """A quantized folder as a stock transformers model on the CPU: QuantLinear for each
    quantized linear, bfloat16 for everything else."""
    folder = Path(ref.path)
    doc = read_quantization(folder)
    if doc is None:
        raise ModelError(f"{folder} is not a quantized model folder", "run `hetegen quantize` first")
    start = time.perf_counter()
    model = meta.meta_model(folder, torch.bfloat16)
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
                bias = reader.read(reader.key_for(f"{name}.bias"), torch.bfloat16, cpu)
            meta.set_module(model, name, QuantLinear(read_quant_weight(reader, name, doc), bias))
        for x in ref.spec.experts:  # stored one by one (quantized or bfloat16), never fused
            act_fn = model.get_submodule(x.name).act_fn
            meta.set_module(model, x.name, load_quant_experts(reader, x, act_fn, torch.bfloat16))
        meta.load_rest(model, reader, cpu, torch.bfloat16, tied, bar, task)  # the rest, as the engine does
    meta.make_buffers(model, torch.device("cpu"))
    meta.check_no_meta(model)
    quantize_head(model)  # the LM head read as int8 every token
    model.eval()
    meta.load_generation_config(model, folder)
    quant_formats = sorted({fmt for fmt, _ in linear_formats(doc).values()})  # mixed: int4, int8
    return LoadedModel(
        model=model,
        device="cpu",
        formats=ComputeFormats(REST_DTYPE, quant="+".join(quant_formats)),
        load_s=time.perf_counter() - start,
        folder=str(folder),
    )
