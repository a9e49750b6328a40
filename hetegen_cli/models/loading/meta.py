"""A stock transformers causal LM built on the meta device (no weight memory) and filled tensor
by tensor from a checkpoint into each tensor's final home. Shared by the engine (split
linears into host buffers) and the quantized loader (models.loading.quantized_loader).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetegen_cli.core.console import printable
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.build import quiet_transformers
from hetegen_cli.models.formats.checkpoint import CheckpointReader


def meta_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The stock transformers model on the meta device (no weight memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as exc:  # transformers raises many types for configs it cannot build
        raise ModelError(
            f"transformers cannot build the model in {folder} ({type(exc).__name__}: "
            f"{printable(str(exc))[:200]})",
            "hetegen runs stock transformers causal LMs (no remote code); check config.json",
        ) from exc


def tied_head(model: nn.Module) -> bool:
    """True when transformers tied the LM head to the input embeddings (OPT, SmolLM2)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def named_tensors(model: nn.Module):
    """(name, tensor) of every parameter and buffer, tied ones listed under each name."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def embedding_key(model: nn.Module, reader: CheckpointReader) -> str | None:
    embed = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is embed), None)
    return reader.key_for(f"{name}.weight") if name is not None else None


def load_rest(
    model: nn.Module,
    reader: CheckpointReader,
    device: torch.device,
    wdt: torch.dtype,
    tied: bool,
    bar: Any,
    task: int,
) -> None:
    """Every parameter/buffer still on meta: read it onto the device (tied head: re-tie)."""
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    retie = False
    for name, tensor in list(named_tensors(model)):
        if not tensor.is_meta:
            continue
        if tied and head_name is not None and name == f"{head_name}.weight":
            retie = True  # read once, as the input embeddings
            bar.advance(task)
            continue
        key = reader.key_for(name)
        if key is None:
            if is_buffer(model, name):
                continue  # non-persistent buffers (rotary tables) are re-created below
            raise ModelError(f"the checkpoint lacks tensor {name}", "re-download or convert the model")
        dtype = wdt if tensor.is_floating_point() else tensor.dtype
        value = reader.read(key, dtype, device)
        set_tensor(model, name, value)
        bar.advance(task)
    if retie and isinstance(head, nn.Linear):
        head.weight = model.get_input_embeddings().weight


def is_buffer(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner)._buffers


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name), attr, module)


def make_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers born on meta, made on `device` as transformers makes them: rotary
    tables by building the rotary module again, any other (Gemma's embedding scale, ...) empty,
    then filled by the model's own `_init_weights`, with every loaded tensor marked initialized
    so that nothing else changes (transformers' `init` functions skip marked tensors)."""
    _recreate_rotary(model, device)
    fresh: list[torch.Tensor] = []
    owners: dict[str, nn.Module] = {}
    for owner_name, owner in model.named_modules():
        for attr in owner._non_persistent_buffers_set:
            buf = owner._buffers.get(attr)
            if buf is not None and buf.is_meta:
                owner._buffers[attr] = torch.empty_like(buf, device=device)
                fresh.append(owner._buffers[attr])
                owners[owner_name] = owner
    if not owners:
        return
    fresh_ids = {id(t) for t in fresh}
    for _, tensor in named_tensors(model):
        if id(tensor) not in fresh_ids:
            tensor._is_hf_initialized = True
    with torch.no_grad():
        for owner in owners.values():
            model._init_weights(owner)


def _recreate_rotary(model: nn.Module, device: torch.device) -> None:
    """Rotary embeddings keep non-persistent tables that were born on meta: build them again."""
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        cls = type(module)
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {"config": getattr(module, "config", model.config)}
        if "device" in params:
            kwargs["device"] = device
        with torch.device("cpu"):
            fresh = cls(**kwargs)
        set_module(model, name, fresh.to(device))


def check_no_meta(model: nn.Module) -> None:
    left = [n for n, t in named_tensors(model) if t.is_meta]
    if left:
        raise ModelError(
            f"{len(left)} tensors were not loaded (first: {', '.join(left[:3])})",
            "this architecture needs support in hetegen's loader; please report it",
        )


def load_generation_config(model: nn.Module, folder: Path) -> None:
    if not (folder / "generation_config.json").exists():
        return
    from transformers import GenerationConfig

    # on failure keep the defaults derived from config.json, as transformers does
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(folder)
