"""The static layer split baseline (llama.cpp `-ngl` style), in hetegen's own process.

The first `gpu_layers` decoder layers, the embeddings, final norm and LM head live on the
device; the CPU computes every other decoder layer whole (linears, attention and its KV cache),
one after the other with the GPU's layers, so one side always waits for the other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetegen_cli.core.errors import ModelError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an OPT / LLaMA-family transformers model."""
    inner = getattr(model, "model", None)
    for candidate in (
        getattr(inner, "layers", None),
        getattr(getattr(inner, "decoder", None), "layers", None),
    ):
        if isinstance(candidate, nn.ModuleList):
            return candidate
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}",
        "the layer-split baseline supports OPT and LLaMA-family models",
    )


def _move(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move tensors (recursively in tuples/lists/dicts) to `device`, casting floating ones."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj  # caches and other objects pass through untouched


def apply_layer_split(
    model: nn.Module,
    gpu_layers: int,
    device: torch.device,
    weights_dtype: torch.dtype,
    cpu_dtype: torch.dtype,
) -> nn.Module:
    """Place a CPU-loaded model: layers [0, gpu_layers) and the rest on `device`, others on CPU.

    CPU layers are cast to `cpu_dtype` and wrapped with hooks that move their inputs to the
    CPU and their outputs back to `device` in `weights_dtype`. Returns the same model.
    """
    layers = decoder_layers(model)
    gpu_layers = max(0, min(gpu_layers, len(layers)))
    cpu_layers = list(layers)[gpu_layers:]
    # Move everything except the CPU layers to the device without the CPU layers ever passing
    # through it (a model larger than the GPU must not touch the device whole): park them as
    # placeholders while the rest moves, then put them back.
    for index in range(gpu_layers, len(layers)):
        layers[index] = nn.Identity()
    model.to(device=device, dtype=weights_dtype)
    for index, layer in enumerate(cpu_layers, start=gpu_layers):
        layers[index] = layer
    for layer in cpu_layers:
        layer.to(device="cpu", dtype=cpu_dtype)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _move(args, torch.device("cpu"), cpu_dtype), _move(kwargs, torch.device("cpu"), cpu_dtype)

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return _move(output, device, weights_dtype)

        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        layer.register_forward_hook(post_hook, with_kwargs=True)
    model.hetegen_layer_split = {"gpu_layers": gpu_layers, "cpu_layers": len(layers) - gpu_layers}
    return model
