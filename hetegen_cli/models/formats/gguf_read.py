"""Reading GGUF files without their tensor data: the architecture, the scalar metadata and
every tensor's place (GgufLayout), with one-line errors for corrupt or truncated files, and
which GGUF architectures hetegen's shapes support (docs/models.md, "Your own GGUF files").
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.shapes import config as shapes_config

#: GGUF architecture -> transformers model_type, where the names differ (transformers'
#: load_gguf_checkpoint renames these; Gemma 3/4 GGUF files hold the text model only)
GGUF_MODEL_TYPES = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading; ModelError (one line, a hint) when it cannot be read or is not
    a well-formed GGUF file (the parsers raise ValueError, struct.error, UnicodeDecodeError)."""
    try:
        with open(path, "rb") as handle:
            yield handle
    except OSError as exc:
        raise ModelError(
            f"cannot read GGUF file {path}: {exc.strerror or exc}", "check the path and its permissions"
        ) from exc
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a valid GGUF file ({exc})",
            "the file may be truncated or of another format; download it again",
        ) from exc


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file; ModelError if corrupt or unsupported.

    Reads only the metadata key/value section, never the tensors.
    """
    with _reading(path) as handle:
        arch = _read_gguf_architecture(handle)
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise ModelError(
            f"GGUF file {path.name} has architecture {arch!r}, which hetegen cannot convert",
            f"supported GGUF architectures: {', '.join(supported)}; "
            "or pass a Hugging Face folder with safetensors weights",
        )
    return arch


def gguf_model_type(arch: str) -> str:
    """The transformers model_type of a GGUF architecture."""
    return GGUF_MODEL_TYPES.get(arch, arch)


def supported_gguf_architectures() -> tuple[str, ...]:
    """GGUF architectures hetegen converts: those llama.cpp names (the gguf package's list,
    and "mistral", which transformers also reads) whose model_type hetegen's shapes support
    (models.shapes.config), so support follows the shapes. Whether transformers can rebuild
    the config is checked when converting, where transformers is imported anyway."""
    from gguf import MODEL_ARCH_NAMES  # a light package: numpy, no torch

    known = sorted({*MODEL_ARCH_NAMES.values(), "mistral"})
    return tuple(a for a in known if gguf_model_type(a) in shapes_config.TESTED_ARCHITECTURES)


def check_expert_tensors(path: Path) -> int:
    """The number of mixture-of-experts layers of the GGUF at `path` (0: a dense model);
    ModelError when one lacks one of its three expert tensors (`blk.N.ffn_gate_exps`,
    `ffn_up_exps`, `ffn_down_exps`) or holds another number of experts than
    `{arch}.expert_count`: said before anything is converted. Reads the metadata and the
    tensor table only."""
    layout = read_gguf_layout(path)
    count = layout.metadata.get(f"{layout.architecture}.expert_count")
    layers = {n.split(".")[1] for n in layout.tensors if n.startswith("blk.") and "_exps." in n}
    for layer in sorted(layers, key=int):
        for part in ("gate", "up", "down"):
            info = expert_tensor(path, layout, int(layer), part, count)
            name = info.name
            if isinstance(count, int) and info.shape[0] != count:
                raise ModelError(
                    f"GGUF tensor {name} holds {info.shape[0]} experts, but "
                    f"{layout.architecture}.expert_count says {count}",
                    "the file's metadata and tensors disagree; download it again",
                )
    return len(layers)


def expert_tensor(path: Path, layout: GgufLayout, layer: int, part: str, count: Any) -> GgufTensorInfo:
    """The 3-D tensor holding `part` (gate, up, down) of every expert of MoE layer `layer`
    (`blk.N.ffn_gate_exps`, ...); ModelError when the file lacks it."""
    name = f"blk.{layer}.ffn_{part}_exps.weight"
    info = layout.tensors.get(name)
    if info is None:
        raise ModelError(
            f"GGUF file {path.name} lacks the tensor {name} (the {part} weights of the {count} "
            f"experts in layer {layer})",
            "the file may be incomplete",
        )
    return info


_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_MAX_KV = 100_000
_MAX_TENSORS = 10_000_000
_SMALL_ARRAY = 4096  # numeric metadata arrays kept (per-layer head counts, ...)


def _read_header(handle: Any) -> tuple[int, int]:
    """(tensor count, metadata key count) after the magic number and the version."""
    if handle.read(4) != b"GGUF":
        raise ValueError("no GGUF magic number")
    (version,) = struct.unpack("<I", _exact(handle, 4))
    if version < 2:
        raise ValueError(f"unsupported GGUF version {version}")
    tensor_count, kv_count = struct.unpack("<QQ", _exact(handle, 16))
    if kv_count > _MAX_KV or tensor_count > _MAX_TENSORS:
        raise ValueError(f"implausible counts: {kv_count} metadata keys, {tensor_count} tensors")
    return tensor_count, kv_count


def _read_gguf_architecture(handle: Any) -> str:
    _, kv_count = _read_header(handle)
    for _ in range(kv_count):
        key = _read_str(handle)
        (vtype,) = struct.unpack("<I", _exact(handle, 4))
        if key == "general.architecture":
            if vtype != 8:
                raise ValueError("general.architecture is not a string")
            return _read_str(handle)
        _skip_value(handle, vtype)
    raise ValueError("no general.architecture key")


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor of a GGUF file: its shape in transformers' order ([rows, cols]; GGUF lists
    the dimensions the other way round), its ggml type id and where its bytes start."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute, in bytes from the start of the file


@dataclass(frozen=True)
class GgufLayout:
    """What a GGUF file holds, read without its tensor data or its metadata arrays (a
    tokenizer's 262,144 tokens are skipped, not parsed): the architecture, the scalar and
    string metadata, and every tensor's place."""

    architecture: str
    metadata: dict[str, Any]  # scalars, strings, and numeric arrays of up to 4,096 items
    tensors: dict[str, GgufTensorInfo]
    array_lengths: dict[str, int]  # every array's item count (the tokens: the vocabulary)


def read_gguf_layout(path: Path) -> GgufLayout:
    """The layout of a GGUF file (GgufLayout); ModelError when it is corrupt or cut short."""
    with _reading(path) as handle:
        layout = _read_layout(handle)
        size = os.fstat(handle.fileno()).st_size
    beyond = [t.name for t in layout.tensors.values() if t.offset > size]
    if beyond:
        raise ModelError(
            f"{path} is truncated: tensor {beyond[0]} starts past its end ({size} bytes)",
            "download the file again",
        )
    return layout


def _read_layout(handle: Any) -> GgufLayout:
    tensor_count, kv_count = _read_header(handle)
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = _read_str(handle)
        (vtype,) = struct.unpack("<I", _exact(handle, 4))
        if vtype in _SCALAR:
            (metadata[key],) = struct.unpack(_SCALAR[vtype], _exact(handle, struct.calcsize(_SCALAR[vtype])))
        elif vtype == 8:
            metadata[key] = _read_str(handle)
        elif vtype == 9:
            item, count = struct.unpack("<IQ", _exact(handle, 12))
            lengths[key] = count
            if item in _SCALAR and count <= _SMALL_ARRAY:
                fmt = _SCALAR[item]
                metadata[key] = list(
                    struct.unpack(f"<{count}{fmt[1:]}", _exact(handle, count * struct.calcsize(fmt)))
                )
            else:
                _skip_array(handle, item, count)
        else:
            _skip_value(handle, vtype)
    infos = []
    for _ in range(tensor_count):
        name = _read_str(handle)
        (dims,) = struct.unpack("<I", _exact(handle, 4))
        if dims > 8:
            raise ValueError(f"tensor {name} has {dims} dimensions")
        shape = struct.unpack(f"<{dims}Q", _exact(handle, 8 * dims))
        type_id, offset = struct.unpack("<IQ", _exact(handle, 12))
        infos.append((name, tuple(int(d) for d in reversed(shape)), type_id, offset))
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    start = -(-handle.tell() // alignment) * alignment
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("no general.architecture key")
    tensors = {n: GgufTensorInfo(n, shape, t, start + off) for n, shape, t, off in infos}
    return GgufLayout(arch, metadata, tensors, lengths)


def _exact(handle: Any, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise ValueError("file ends inside its metadata")
    return data


def _read_str(handle: Any) -> str:
    (length,) = struct.unpack("<Q", _exact(handle, 8))
    if length > 1 << 24:
        raise ValueError(f"implausible string length {length}")
    return _exact(handle, length).decode("utf-8")


def _skip_value(handle: Any, vtype: int) -> None:
    if vtype in _SCALAR:
        _exact(handle, struct.calcsize(_SCALAR[vtype]))
    elif vtype == 8:
        (length,) = struct.unpack("<Q", _exact(handle, 8))
        handle.seek(length, os.SEEK_CUR)
    elif vtype == 9:
        _skip_array(handle, *struct.unpack("<IQ", _exact(handle, 12)))
    else:
        raise ValueError(f"unknown metadata value type {vtype}")


def _skip_array(handle: Any, item: int, count: int) -> None:
    """Past `count` metadata values of type `item` (seeks over numeric ones)."""
    if item in _SCALAR:
        handle.seek(count * struct.calcsize(_SCALAR[item]), os.SEEK_CUR)
    else:
        for _ in range(count):
            _skip_value(handle, item)
