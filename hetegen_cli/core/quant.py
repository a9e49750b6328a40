"""Weight-only quantization formats: names, sizes, and which shapes their CPU kernels take
(pure Python; the tensors and kernels are in models.formats.quant).

- `int8`: per output channel, symmetric: w = q * scale[row], q in [-127, 127]; scale float16.
- `int4`: per group of `group_size` inputs of a row, asymmetric: w = q * scale + min, q in
  [0, 15], scale and min float16 per group (the layout of GGUF's Q4_1; Q4_0 is min = -8 scale).
  Two values per byte, the even column in the low nibble.

Bytes per parameter: int8 1 + 2/in, int4 0.5 + 4/group (0.625 at group 32).
"""

from __future__ import annotations

from hetegen_cli.core.errors import UsageError

QUANT_FORMATS = ("int8", "int4")
QUANT_CHOICES = ("auto", "none", *QUANT_FORMATS)  # auto: as the model is stored
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # GGUF's Q4_0/Q4_1 block: their files map onto int4 without requantizing
SCALE_BYTES = 2  # float16 scales (and int4 mins)
#: the LM head of a quantized model on the CPU, quantized at load: int8 per row cost +0.14 %
#: perplexity on the default model (int4 +5 %), docs/quant.md
HEAD_FORMAT = "int8"


def check_quant(name: str, flag: str = "--quant") -> str:
    """`name` if it is a --quant choice (auto, none, int8, int4), else UsageError."""
    if name not in QUANT_CHOICES:
        raise UsageError(f"unknown {flag} {name!r}", f"use one of {', '.join(QUANT_CHOICES)}")
    return name


def check_group_size(group: int) -> int:
    if group not in INT4_GROUP_SIZES:
        raise UsageError(
            f"--group-size {group} is not supported",
            f"use one of {', '.join(map(str, INT4_GROUP_SIZES))} (32 matches GGUF Q4 files)",
        )
    return group


def weight_bytes(fmt: str, out_features: int, in_features: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of one quantized weight [out, in] with its scales (and int4 mins)."""
    if fmt == "int8":
        return out_features * in_features + out_features * SCALE_BYTES
    if fmt == "int4":
        groups = in_features // group_size
        return out_features * in_features // 2 + out_features * groups * 2 * SCALE_BYTES
    raise ValueError(f"not a quantized format: {fmt!r}")


def part_shapes(fmt: str, rows: int, in_features: int, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """{part: (shape, bytes per element)} of `rows` rows of a quantized weight, the layout
    stored on disk and held by the engine: int8 q [rows, in] int8, scale [rows] float16; int4
    q [rows, in / 2] uint8, scale and min [rows, in / group] float16."""
    if fmt == "int8":
        return {"q": ((rows, in_features), 1), "scale": ((rows,), SCALE_BYTES)}
    if fmt == "int4":
        groups = (rows, in_features // group_size)
        return {
            "q": ((rows, in_features // 2), 1),
            "scale": (groups, SCALE_BYTES),
            "min": (groups, SCALE_BYTES),
        }
    raise ValueError(f"not a quantized format: {fmt!r}")


def kernel_takes(fmt: str, out_features: int, in_features: int, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether torch's CPU kernel for `fmt` computes [out, in] correctly. Measured on torch
    2.13: the int8 kernel needs in % 16 == 0 (24 or 40 inputs gave wrong results, 5 crashed
    the process); the int4 kernel needs out % 16 == 0 and in % group == 0. Other linears stay
    in floating point (models.formats.quant also checks every kernel numerically at load)."""
    if fmt == "int8":
        return in_features >= 16 and in_features % 16 == 0
    if fmt == "int4":
        return out_features % 16 == 0 and in_features % group_size == 0 and in_features % 2 == 0
    return False
