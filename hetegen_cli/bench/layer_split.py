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
    """Place a CPU-loaded model (already in `weights_dtype`): layers [0, gpu_layers) and
    everything outside the decoder layers on `device`, the other layers on the CPU with their
    parameters in `cpu_dtype`. Returns the same model.

    Only devices move (and only parameters are cast): buffers such as the rotary `inv_freq`
    keep their dtype. Activations cross at the boundary only: the first CPU layer moves its
    inputs to the CPU, the last one moves its output back, so consecutive CPU layers pass
    tensors on the CPU as llama.cpp's CPU layers do.
    """
    layers = decoder_layers(model)
    gpu_layers = max(0, min(gpu_layers, len(layers)))
    cpu_layers = list(layers)[gpu_layers:]
    # Move everything except the CPU layers to the device without the CPU layers ever passing
    # through it (a model larger than the GPU must not touch the device whole): park them as
    # placeholders while the rest moves, then put them back.
    for index in range(gpu_layers, len(layers)):
        layers[index] = nn.Identity()
    model.to(device=device)
    for index, layer in enumerate(cpu_layers, start=gpu_layers):
        layers[index] = layer
    cpu = torch.device("cpu")

    def to_cpu(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # a no-op for tensors already on the CPU in cpu_dtype (every CPU layer but the first);
        # masks and rotary tables from the model come from the device for each layer
        return _move(args, cpu, cpu_dtype), _move(kwargs, cpu, cpu_dtype)

    def to_device(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _move(output, device, weights_dtype)

    for layer in cpu_layers:
        layer.to(device=cpu)
        for param in layer.parameters():
            if param.is_floating_point():
                param.data = param.data.to(cpu_dtype)
        layer.register_forward_pre_hook(to_cpu, with_kwargs=True)
    if cpu_layers:
        cpu_layers[-1].register_forward_hook(to_device, with_kwargs=True)
    model.hetegen_layer_split = {"gpu_layers": gpu_layers, "cpu_layers": len(layers) - gpu_layers}
    return model
