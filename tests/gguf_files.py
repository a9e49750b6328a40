"""Real GGUF files for tests, written by the `gguf` package's GGUFWriter with real block
bytes: tensors of any type (K-quants from models.formats.gguf_blocks' encoders or, for types
nothing can quantize, random bytes, which are a valid block of every type once its float16
scales are finite), and copies of a file with some tensors replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: byte ranges of each block type's float16 scales (the rest of a block is any bytes)
_FLOAT16_AT = {
    "Q2_K": (80, 82, 82, 84),  # scales 16, qs 64, d, dmin
    "Q3_K": (108, 110),  # hmask 32, qs 64, scales 12, d
    "Q5_K": (0, 2, 2, 4),  # d, dmin, scales 12, qh 32, qs 128
    "Q6_K": (208, 210),  # ql 128, qh 64, scales 16, d
    "Q4_K": (0, 2, 2, 4),
    "Q5_0": (0, 2),
    "Q5_1": (0, 2, 2, 4),
}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0, scale: float = 1e-3) -> np.ndarray:
    """Random but valid blocks of `kind`: uint8 [rows, row bytes], every float16 scale set to
    a random value in [scale/2, scale)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    spans = _FLOAT16_AT[kind]
    for start, end in zip(spans[::2], spans[1::2], strict=True):
        values = (scale * (0.5 + 0.5 * rng.random((rows, cols // block)))).astype(np.float16)
        raw[..., start:end] = values.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_gguf(
    path: Path, tensors: list[tuple[str, str, np.ndarray]], arch: str = "llama", fields=()
) -> Path:
    """A GGUF file at `path` holding `tensors`: (name, type, array), the array float32 values
    for F32 and raw block bytes uint8 [rows, row bytes] for anything else; `fields` are
    (key, value, GGUFValueType, item type) metadata entries."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub)
    for name, kind, array in tensors:
        if kind == "F32":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def copy_gguf(
    src: Path, dst: Path, replace: dict[str, tuple[str, np.ndarray]], drop: tuple[str, ...] = ()
) -> Path:
    """`src` rewritten as `dst` with the tensors named in `replace` stored as (type, raw
    bytes) instead and those in `drop` left out: every metadata key and every other tensor
    copied as it is."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    fields = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    tensors = []
    for t in reader.tensors:
        if t.name in drop:
            continue
        if t.name in replace:
            kind, raw = replace[t.name]
            tensors.append((t.name, kind, raw))
        elif t.tensor_type.name == "F32":
            tensors.append((t.name, "F32", np.array(t.data)))
        else:
            tensors.append((t.name, t.tensor_type.name, np.array(t.data)))
    return write_gguf(dst, tensors, arch, fields)
