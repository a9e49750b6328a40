"""A quantized model's decode steps run straight from its files with numpy and hetegen's
kernels: no torch, no transformers (docs/run.md, "Direct start").

A causal LM whose every decode step hetegen fuses (models.formats.decode_steps: each layer
a norm, an attention, a norm and a gated MLP, four kernel calls) needs nothing from torch or
transformers at one token but its weights and a `Layout`: which stored tensor feeds which
kernel argument, and the few numbers (norm eps, rotary frequencies, head counts) the fused
steps took from transformers' modules. run.direct_check writes the Layout from a loaded,
fused model and keeps it only when this module's logits match that model's; `DirectModel`
then runs it in a process that never imports torch (importing torch and transformers'
model code is most of a cold start).

Shapes: H hidden, V vocabulary, one token at a time (batch 1); activations float32.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetegen_cli.models.formats import kernel_lib
from hetegen_cli.models.shapes.headers import read_safetensors_header, safetensors_files

LAYOUT_VERSION = 1
#: safetensors dtype codes numpy reads as they are (BF16 is widened to float32 on reading)
_NUMPY = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I32": np.int32}


class LayoutError(ValueError):
    """The layout does not fit the folder's tensors (a name missing, a shape that differs)."""


@dataclass
class Tensors:
    """A folder's safetensors tensors as numpy arrays over the mapped files (read-only),
    BF16 ones widened to float32 copies on reading."""

    entries: dict[str, tuple[np.memmap, str, tuple[int, ...], int, int]]

    @classmethod
    def open(cls, folder: Path, extra: tuple[Path, ...] = ()) -> Tensors:
        """The tensors of `folder`'s safetensors files and of the `extra` files (a record's
        tensors that are made at load, e.g. a quantized LM head)."""
        entries: dict[str, tuple[np.memmap, str, tuple[int, ...], int, int]] = {}
        for file in (*safetensors_files(folder), *extra):
            header = read_safetensors_header(file)  # validated: offsets tile the data section
            with file.open("rb") as fh:
                start = 8 + struct.unpack("<Q", fh.read(8))[0]
            data = np.memmap(file, dtype=np.uint8, mode="r")
            for name, meta in header.items():
                if name != "__metadata__":
                    a, b = meta["data_offsets"]
                    entries[name] = (data, meta["dtype"], tuple(meta["shape"]), start + a, start + b)
        return cls(entries)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name` (contiguous; float32 for BF16), checked against `shape`."""
        if name not in self.entries:
            raise LayoutError(f"tensor {name!r} is not in the model's files")
        data, code, stored, a, b = self.entries[name]
        if shape is not None and tuple(shape) != stored:
            raise LayoutError(f"tensor {name!r} is {list(stored)}, not {list(shape)}")
        raw = data[a:b]
        if code == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(stored)
        if code not in _NUMPY:
            raise LayoutError(f"tensor {name!r} is stored as {code}, which the direct path does not read")
        return raw.view(_NUMPY[code]).reshape(stored)

    def row(self, name: str, i: int) -> np.ndarray:
        """Row i of a 2-D tensor as float32, without widening the rest (an embedding lookup)."""
        data, code, stored, a, b = self.entries[name]
        width = stored[1] * (b - a) // max(1, stored[0] * stored[1])  # bytes per row
        raw = data[a + i * width : a + (i + 1) * width]
        if code == "BF16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return raw.view(_NUMPY[code]).astype(np.float32)

    def floats(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as a float32 contiguous array of its own."""
        return np.ascontiguousarray(self.get(name, shape), dtype=np.float32)


class _Linear:
    """One quantized linear of the layout: its kernel description ({format, q, scale, min,
    rows, in, group}, int64) over the mapped tensors, and its bias (float32) or None."""

    def __init__(self, spec: dict[str, Any], tensors: Tensors) -> None:
        name, rows, k, fmt = spec["name"], int(spec["rows"]), int(spec["in"]), spec["format"]
        self.rows, self.k, self.fmt, self.group = rows, k, fmt, int(spec.get("group") or 0)
        if fmt == "int8":
            self.q = tensors.get(f"{name}.weight.q", (rows, k))
            self.scale = tensors.get(f"{name}.weight.scale", (rows,))
            self.min = None
        elif fmt == "int4":
            ng = k // self.group
            self.q = tensors.get(f"{name}.weight.q", (rows, k // 2))
            self.scale = tensors.get(f"{name}.weight.scale", (rows, ng))
            # without "min" (or with it False) symmetric, as the loaded module holds it
            self.min = tensors.get(f"{name}.weight.min", (rows, ng)) if spec.get("min") else None
        else:
            raise LayoutError(f"linear {name!r} is stored as {fmt!r}, not int4 or int8")
        self.bias = tensors.floats(spec["bias"], (rows,)) if spec.get("bias") else None

    def desc(self) -> list[int]:
        if self.fmt == "int8":
            return [1, self.q.ctypes.data, self.scale.ctypes.data, 0, self.rows, self.k, 0]
        mn = self.min.ctypes.data if self.min is not None else 0
        return [0, self.q.ctypes.data, self.scale.ctypes.data, mn, self.rows, self.k, self.group]


def _ptr(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data


def _norm(spec: dict[str, Any], tensors: Tensors, width: int) -> tuple[np.ndarray, float, float]:
    return tensors.floats(spec["weight"], (width,)), float(spec["eps"]), float(spec["shift"])


class _Attention:
    """One attention's kernel arguments (as models.formats.decode_steps._AttentionStep builds
    them) and its KV buffers [kv heads, room, head dim] float32."""

    def __init__(self, spec: dict[str, Any], tensors: Tensors, hidden: int) -> None:
        nh, nkv, hd = int(spec["heads"]), int(spec["kv_heads"]), int(spec["head_dim"])
        self.nkv, self.hd = nkv, hd
        self.proj = [_Linear(p, tensors) for p in spec["proj"]]
        want = [(nh * hd, hidden), (nkv * hd, hidden), (nkv * hd, hidden), (hidden, nh * hd)]
        if [(p.rows, p.k) for p in self.proj] != want:
            raise LayoutError(f"attention projections are {[(p.rows, p.k) for p in self.proj]}, not {want}")
        modes, weights, nf = [], [], []
        for key, heads in (("q_norm", nh), ("k_norm", nkv)):
            n = spec.get(key)
            if n is None:
                modes.append(0), weights.append(None), nf.extend((0.0, 0.0))
                continue
            mode = int(n["mode"])
            w, eps, shift = _norm(n, tensors, hd if mode == 1 else heads * hd)
            modes.append(mode), weights.append(w), nf.extend((eps, shift))
        self.keep = [p.bias for p in self.proj] + weights
        descs = [p.desc() for p in self.proj]
        self.desc = (ctypes.c_int64 * 28)(*[v for d in descs for v in d])
        ints = [hidden, nh, nkv, hd, *modes, 0, 0, *(_ptr(p.bias) for p in self.proj), *map(_ptr, weights), 0]
        self.ints = (ctypes.c_int64 * len(ints))(*ints)
        self.floats = (ctypes.c_float * 5)(*nf, float(spec["scaling"]))
        self.k = self.v = np.empty(0, np.float32)

    def reset(self, room: int) -> None:
        self.k = np.zeros((self.nkv, room, self.hd), np.float32)
        self.v = np.zeros((self.nkv, room, self.hd), np.float32)
        self.ints[6] = room


class DirectModel:
    """The decode steps of a quantized causal LM from its folder (and `extra` safetensors
    files) and `layout` (a dict as run.direct_check writes it). `start(room)` empties the KV
    cache for `room` positions; `step(token)` runs one token at the next position -> logits
    [V] float32 (a buffer reused by the next step). One caller at a time."""

    def __init__(
        self, folder: Path, layout: dict[str, Any], threads: int | None = None, extra: tuple[Path, ...] = ()
    ) -> None:
        if layout.get("version") != LAYOUT_VERSION:
            raise LayoutError(f"layout version {layout.get('version')!r} is not {LAYOUT_VERSION}")
        self.lib = kernel_lib.load()
        self.threads = threads or default_threads()
        tensors = Tensors.open(folder, extra)
        h, self.vocab = int(layout["hidden"]), int(layout["vocab"])
        self.hidden = h
        self.tensors, self.embed = tensors, layout["embed"]
        if tensors.entries.get(self.embed, (None, "", ()))[2] != (self.vocab, h):
            raise LayoutError(f"the embedding {self.embed!r} is not a [{self.vocab}, {h}] tensor")
        if tensors.entries[self.embed][1] not in ("BF16", *_NUMPY):
            raise LayoutError(f"the embedding is stored as {tensors.entries[self.embed][1]}")
        rope = layout["rope"]
        self.inv_freq = np.asarray(rope["inv_freq"], np.float32)
        self.rope_scaling = np.float32(rope["scaling"])
        self.layers = []
        for spec in layout["layers"]:
            attn = _Attention(spec["attn"], tensors, h)
            if 2 * self.inv_freq.size != attn.hd:
                raise LayoutError(f"{self.inv_freq.size} rotary frequencies for head dim {attn.hd}")
            gate, up, down = (_Linear(p, tensors) for p in spec["mlp"])
            if (gate.k, up.k, down.rows, up.rows, down.k) != (h, h, h, gate.rows, gate.rows):
                raise LayoutError("the MLP's shapes do not chain")
            if any(p.bias is not None for p in (gate, up, down)):
                raise LayoutError("the fused MLP takes no biases")
            ffn = np.array([gate.desc() + up.desc() + down.desc()], np.int64)
            norms = (_norm(spec["norm1"], tensors, h), _norm(spec["norm2"], tensors, h))
            self.layers.append((norms[0], attn, norms[1], ffn, (gate, up, down)))
        self.norm = _norm(layout["norm"], tensors, h)
        head = layout["head"]
        if "float" in head:
            w = tensors.get(head["float"], (self.vocab, h))
            self.head_float, self.head = np.ascontiguousarray(w, np.float32), None
            self.tied = head["float"] == self.embed
        else:
            self.head_float, self.head, self.tied = None, _Linear(head, tensors), False
            if (self.head.rows, self.head.k) != (self.vocab, h):
                raise LayoutError(f"the LM head is {[self.head.rows, self.head.k]}, not {[self.vocab, h]}")
        self.x, self.h = np.empty(h, np.float32), np.empty(h, np.float32)
        self.logits = np.empty(self.vocab, np.float32)
        self.one = ((ctypes.c_int32 * 1)(0), (ctypes.c_float * 1)(1.0))
        self.pos = 0
        self.room = 0

    def start(self, room: int) -> None:
        """An empty cache with room for `room` positions."""
        for layer in self.layers:
            layer[1].reset(room)
        self.pos, self.room = 0, room

    def step(self, token: int) -> np.ndarray:
        """Logits [V] after `token` at the next position (the cache advances by one)."""
        if not 0 <= token < self.vocab:
            raise ValueError(f"token {token} is outside the vocabulary of {self.vocab}")
        if self.pos >= self.room:
            raise ValueError(f"the cache holds {self.room} positions; start() it with more room")
        lib, th, h, x, hb = self.lib, self.threads, self.hidden, self.x, self.h
        x[:] = self.head_float[token] if self.tied else self.tensors.row(self.embed, token)
        angle = self.inv_freq * np.float32(self.pos)
        angle = np.concatenate((angle, angle))
        cos = np.cos(angle) * self.rope_scaling
        sin = np.sin(angle) * self.rope_scaling
        xp, hp = x.ctypes.data, hb.ctypes.data
        for (w1, e1, s1), attn, (w2, e2, s2), ffn, _ in self.layers:
            lib.hetegen_rms_norm(xp, w1.ctypes.data, 1, h, e1, s1, hp)
            attn.ints[7], attn.ints[14] = self.pos, 1
            rc = lib.hetegen_attention_decode(
                ctypes.addressof(attn.desc), ctypes.addressof(attn.ints), ctypes.addressof(attn.floats),
                hp, cos.ctypes.data, sin.ctypes.data, attn.k.ctypes.data, attn.v.ctypes.data, xp, th,
            )  # fmt: skip
            if rc:
                raise ValueError(f"hetegen's fused attention refused its input ({rc})")
            lib.hetegen_rms_norm(xp, w2.ctypes.data, 1, h, e2, s2, hp)
            sel, coef = self.one
            rc = lib.hetegen_gated_ffn(
                ffn.ctypes.data, 1, ctypes.addressof(sel), ctypes.addressof(coef), hp, h, xp, th
            )
            if rc:
                raise ValueError(f"hetegen's fused MLP refused its input ({rc})")
        w, eps, shift = self.norm
        lib.hetegen_rms_norm(xp, w.ctypes.data, 1, h, eps, shift, hp)
        self.pos += 1
        if self.head_float is not None:
            np.matmul(self.head_float, hb, out=self.logits)
            return self.logits
        head = self.head
        if head.fmt == "int8":
            rc = lib.hetegen_int8_gemm(
                head.q.ctypes.data, head.scale.ctypes.data, head.rows, h, hp, 1, self.logits.ctypes.data,
                head.rows, th,
            )  # fmt: skip
        else:
            rc = lib.hetegen_int4_gemm(
                head.q.ctypes.data, head.scale.ctypes.data, _ptr(head.min), head.rows, h, head.group, hp, 1,
                self.logits.ctypes.data, head.rows, th,
            )  # fmt: skip
        if rc:
            raise ValueError(f"hetegen's {head.fmt} kernel failed ({rc})")
        if head.bias is not None:
            self.logits += head.bias
        return self.logits


def default_threads() -> int:
    """The threads the kernels use: OMP_NUM_THREADS when set, else the physical cores (torch's
    own default, so both paths compute with the same split)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def read_layout(path: Path) -> dict[str, Any] | None:
    """A layout file's content, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
