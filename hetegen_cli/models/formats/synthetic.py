"""Synthetic checkpoints: any preset's shapes with random (never all-zero) weights.

Writes a real safetensors file tensor by tensor, so peak RAM is one tensor, not the model.
Used by `bench --synthetic` to benchmark OPT-30B-class shapes without a model hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.core.console import activity
from hetegen_cli.core.devices import dtype_name, torch_dtype
from hetegen_cli.core.dtypes import WEIGHT_DTYPES, to_safetensors
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes import presets

_MARKER = ".hetegen-complete"


def is_built(folder: Path) -> bool:
    """True when `folder` was finished by `building`."""
    return (folder / _MARKER).exists()


@contextlib.contextmanager
def building(folder: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A fresh temporary folder (`tmp`, default beside `folder`) to write `folder`'s files
    into; when the block succeeds it is marked complete and replaces `folder` in one rename,
    when it fails it is removed: a reader never sees half a folder."""
    tmp = tmp or folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / _MARKER).write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `config` stores, in module order.

    Built on the meta device (no memory). Tied LM heads are omitted, as save_pretrained does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    shapes = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        shapes.append((name, tuple(tensor.shape)))
    return shapes


_POOL_SIZE = (1 << 24) + 7  # an odd length so tiles of consecutive tensors do not line up


class RandomPool:
    """Fast seeded pseudo-random fill: tiles of pre-scaled random pools at random offsets.

    Drawing N(0, 1) for every weight runs at ~0.14 Gparam/s on one core (a 6.7B model would
    take ~50 s); tiling a 16 Mi-value pool from random offsets is one copy per value and still
    gives random-looking, never all-zero data. Weights are for timing, not for quality:
    matrices ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02), biases ~ N(0, 0.01).
    """

    def __init__(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        self.generator = generator
        base = torch.randn(_POOL_SIZE, generator=generator)
        self.pools = {
            "weight": (0.02 * base).to(dtype),
            "norm": (1.0 + 0.02 * base).to(dtype),
            "bias": (0.01 * base).to(dtype),
        }
        self.dtype = dtype

    def sample(self, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `shape` in the pool dtype, drawn from pool `kind` (weight, norm, bias)."""
        pool = self.pools[kind]
        numel = 1
        for dim in shape:
            numel *= dim
        out = torch.empty(numel, dtype=self.dtype)
        filled = 0
        while filled < numel:
            start = int(torch.randint(0, _POOL_SIZE, (1,), generator=self.generator))
            take = min(numel - filled, _POOL_SIZE - start)
            out[filled : filled + take] = pool[start : start + take]
            filled += take
        return out.view(shape)


def random_tensor(name: str, shape: tuple[int, ...], pool: RandomPool) -> torch.Tensor:
    """Random values for checkpoint tensor `name` (see RandomPool for the distributions)."""
    if "norm" in name and name.endswith(".weight"):
        return pool.sample("norm", shape)
    if name.endswith(".bias"):
        return pool.sample("bias", shape)
    return pool.sample("weight", shape)


def write_safetensors_streaming(
    path: Path,
    shapes: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file whose tensors come from `make(name, shape)` one at a time."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "producer": "hetegen synthetic"}}
    offset = 0
    for name, shape in shapes:
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        header[name] = {
            "dtype": to_safetensors(dtype_name(dtype)),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name, shape in shapes:
            tensor = make(name, shape).contiguous()
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            if on_tensor:
                on_tensor(tensor.numel() * itemsize)


def synthetic_folder(preset: str, dtype: str, root: Path) -> Path:
    return root / f"synthetic-{preset}-{dtype}"


def build_synthetic_model(preset: str, dtype: str, root: Path, seed: int = 0, progress: Any = None) -> Path:
    """A folder with config.json + model.safetensors of random weights for `preset`.

    Reused when already complete. Written to a temporary folder and renamed when done.
    """
    if preset not in presets.PRESETS:
        raise ModelError(
            f"unknown preset {preset!r} for --synthetic", "known: " + ", ".join(presets.preset_names())
        )
    if dtype not in WEIGHT_DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}", "use float16, bfloat16 or float32")
    folder = synthetic_folder(preset, dtype, root)
    if is_built(folder):
        return folder
    config = presets.preset_config(preset)
    config["torch_dtype"] = dtype
    shapes = tensor_shapes(config)
    tdtype = torch_dtype(dtype)
    total = sum(torch.Size(s).numel() for _, s in shapes) * tdtype.itemsize
    free = (
        shutil.disk_usage(root if root.exists() else root.parent).free
        if (root.exists() or root.parent.exists())
        else None
    )
    if free is not None and free < total * 1.05:
        raise ModelError(
            f"not enough disk for a synthetic {preset}: needs {total / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free under {root}",
            "set HETEGEN_HOME to a larger disk",
        )
    pool = RandomPool(torch.Generator().manual_seed(seed), tdtype)
    task = progress.add_task(f"writing synthetic {preset} ({dtype})", total=total) if progress else None
    with activity(f"writing the synthetic {preset} checkpoint"), building(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors_streaming(
            tmp / "model.safetensors",
            shapes,
            tdtype,
            lambda name, shape: random_tensor(name, shape, pool),
            (lambda n: progress.advance(task, n)) if progress else None,
        )
    return folder
