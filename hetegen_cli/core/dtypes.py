"""The one dtype table: names, bytes per element, safetensors codes (pure Python, no torch).

Weights run in one of `WEIGHT_DTYPES`; a checkpoint may store any dtype of `DTYPES`.
`core.devices.torch_dtype(name)` maps a name to the torch dtype.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type. `greedy_tolerance`: top1 - top2 logit margin (relative to
    max(1, |top1|)) below which two correct implementations in this dtype may pick either
    token greedily (a near tie); None for non-floating types."""

    name: str
    itemsize: int  # bytes per element
    safetensors: str  # dtype code in safetensors headers
    floating: bool
    greedy_tolerance: float | None = None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float64", 8, "F64", True, 1e-6),
        DType("float32", 4, "F32", True, 1e-3),
        DType("bfloat16", 2, "BF16", True, 5e-2),
        DType("float16", 2, "F16", True, 2e-2),
        DType("int64", 8, "I64", False),
        DType("int32", 4, "I32", False),
        DType("int16", 2, "I16", False),
        DType("int8", 1, "I8", False),
        DType("uint8", 1, "U8", False),
        DType("bool", 1, "BOOL", False),
    )
}

#: dtypes weights can be run in (the CPU share, the streamed and resident weights)
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")
#: --dtype of run, serve and eval: a weight dtype, or auto (chosen by device and profile)
DTYPE_CHOICES = ("auto", *WEIGHT_DTYPES)

_BY_SAFETENSORS = {d.safetensors: d.name for d in DTYPES.values()}


def itemsize(name: str) -> int:
    """Bytes per element of dtype `name` (KeyError for unknown names)."""
    return DTYPES[name].itemsize


def from_safetensors(code: str) -> str | None:
    """The dtype name of a safetensors header code ("F16" -> "float16"); None if unknown."""
    return _BY_SAFETENSORS.get(code)


def to_safetensors(name: str) -> str:
    """The safetensors header code of dtype `name` ("bfloat16" -> "BF16")."""
    return DTYPES[name].safetensors


@dataclass(frozen=True)
class ComputeFormats:
    """The formats a model computes in: its float weights' dtype; the CPU share's format per
    phase (prefill, decode) when the CPU computes rows of split linears; the quantized
    linears' format, if any. `label` renders them for people ("float16+float32",
    "int4+bfloat16"); nothing parses it back."""

    weights: str
    cpu: tuple[str, str] | None = None
    quant: str | None = None

    @property
    def label(self) -> str:
        """The quantized format first, then the weights dtype, then the CPU formats not named yet."""
        names = [self.quant] if self.quant else []
        names.append(self.weights)
        names += [d for d in dict.fromkeys(self.cpu or ()) if d not in names]
        return "+".join(names)


def greedy_tolerance(*labels: str | None) -> float:
    """The loosest near-tie tolerance of the dtypes in labels such as 'float16+float32'."""
    parts = [p for label in labels if label for p in label.split("+")]
    loosest = DTYPES["bfloat16"].greedy_tolerance
    values = [
        DTYPES[p].greedy_tolerance if p in DTYPES and DTYPES[p].greedy_tolerance else loosest for p in parts
    ]
    return max(values, default=loosest)
