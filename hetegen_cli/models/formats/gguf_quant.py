"""GGUF files straight into hetegen's quantized layout (models.shapes.quantfile), tensor by
tensor, without a float copy.

Each linear loads in its own format (models.formats.gguf_blocks.NATIVE, docs/models.md "GGUF
types"): Q4_0/Q4_1 blocks map onto int4 groups of 32 exactly, Q4_K onto int4 groups of 32
within float16 rounding of each group's scale and offset, and Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 become
int8, re-quantized per row from their exact values. A file whose linears use several types
(llama.cpp's Q4_K_M keeps attn_v and part of ffn_down in Q6_K) gives a mixed folder: int4 and
int8 linears side by side, each recorded in quantization.json. `--quant int8` / `int4` instead
asks for one format for every linear (re-quantized from the exact values where the blocks do
not map). Embeddings, norms and a separate LM head are dequantized to bfloat16.

A mixture-of-experts file's routed experts (`blk.N.ffn_gate_exps` / `ffn_up_exps` /
`ffn_down_exps`, one [E, rows, inputs] tensor per part and layer: Qwen2-MoE, Qwen3-MoE,
OLMoE, and Mixtral as a llama file with experts) are written expert by expert, each expert's
part in the format its GGUF type maps to, under models.shapes.experts.quant_expert_key: never
the fused float tensors transformers' GGUF loader builds (docs/models.md, "GGUF MoE files").

Types with no mapping (Q2_K, Q3_K, the IQ*, TQ* and MXFP4 types) are refused before any
conversion, with the supported list; `allow_float_copy` dequantizes those linears to bfloat16
instead, after saying what that costs. LLaMA's q/k rows are stored permuted in GGUF and are put
back in transformers' order (whole rows move, so quantized rows move unchanged); Gemma's norm
weights are stored plus one and get it subtracted (transformers' GGUF loader does the same).

Memory: the file is read with plain reads (no memory map that would pull it all into the
process), one tensor at a time (embeddings and other bfloat16 tensors a chunk of rows at a
time), and model.safetensors is written as each tensor is ready (models.formats.stream_write):
the peak is the process's own size plus about one tensor, not the model.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetegen_cli.core import quant
from hetegen_cli.core.console import progress
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.formats.compat import patch_for_both_versions
from hetegen_cli.models.formats.gguf_blocks import (
    CHUNK_VALUES,
    EXACT_INT4,
    FLOAT_TYPES,
    NATIVE,
    dequantize_rows,
    row_bytes,
    to_quant_weight,
)
from hetegen_cli.models.formats.gguf_config import config_and_tokenizer
from hetegen_cli.models.formats.gguf_read import GgufTensorInfo, expert_tensor, read_gguf_layout
from hetegen_cli.models.formats.gguf_types import FLOAT_COPY_FLAG, check_types, type_name
from hetegen_cli.models.formats.quant import QuantWeight, quantize
from hetegen_cli.models.formats.quantized import write_folder
from hetegen_cli.models.formats.stream_write import TensorEntry, TensorStream
from hetegen_cli.models.shapes.experts import PARTS, ExpertsSpec, quant_expert_key
from hetegen_cli.models.shapes.quantfile import quantization_doc
from hetegen_cli.models.shapes.spec import ModelSpec

#: architectures whose norm weights GGUF stores plus one (transformers' Gemma2TensorProcessor)
NORM_PLUS_ONE = ("gemma2", "gemma3", "nemotron")


def _row_order(out: int, heads: int) -> torch.Tensor:
    """GGUF -> transformers row order of a LLaMA q or k weight with `heads` heads."""
    dim = out // heads // 2
    return torch.arange(out).reshape(heads, dim, 2).transpose(1, 2).reshape(-1)


def _read_rows(handle, info: GgufTensorInfo, start: int, count: int) -> np.ndarray:
    """Raw bytes of rows [start, start + count) of `info`: uint8 [count, row bytes], read
    into a fresh buffer (no memory map: what was read is freed with the array)."""
    per_row = row_bytes(type_name(info.type_id), info.shape[-1])
    handle.seek(info.offset + start * per_row)
    data = bytearray(count * per_row)
    if handle.readinto(data) != len(data):
        raise ModelError(f"the GGUF file ends inside tensor {info.name}", "download the file again")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, per_row)


@dataclass(frozen=True)
class _Job:
    """One stored tensor: its transformers name, where it is in the GGUF, and how it is
    written (`fmt` int4/int8 for a quantized linear, None for bfloat16). An expert's part is
    rows [row0, row0 + out) of its layer's 3-D GGUF tensor; `stored` is the tensor's shape when
    it differs from the GGUF's (Qwen2-MoE's shared_expert_gate [1, H], stored [H])."""

    name: str
    info: GgufTensorInfo
    kind: str
    fmt: str | None
    order: torch.Tensor | None = None
    minus_one: bool = False
    row0: int = 0
    stored: tuple[int, ...] | None = None
    expert: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stored or self.info.shape

    def entries(self, group: int) -> list[TensorEntry]:
        if self.fmt is None:
            return [TensorEntry(self.name, torch.bfloat16, self.shape)]
        out, inp = self.shape
        parts = quant.part_shapes(self.fmt, out, inp, group)
        dtypes = {"q": torch.int8 if self.fmt == "int8" else torch.uint8}
        return [
            TensorEntry(f"{self.name}.{p}", dtypes.get(p, torch.float16), s) for p, (s, _) in parts.items()
        ]


@dataclass
class GgufConversion:
    """A planned conversion: the config, the spec with each linear's format, the jobs in the
    order model.safetensors holds them, and what each linear becomes (for quantization.json)."""

    gguf: Path
    config: dict
    spec: ModelSpec
    jobs: list[_Job]
    group: int
    request: str  # auto, int8 or int4
    float_copied: tuple[str, ...]

    @property
    def entries(self) -> list[TensorEntry]:
        return [e for job in self.jobs for e in job.entries(self.group)]

    @property
    def label(self) -> str:
        """The folder's format label: int4, int8, MIXED, or bfloat16 (no quantized linear)."""
        return self.spec.quant or "bfloat16"


def plan_conversion(gguf: Path, out: Path, fmt: str, group: int, allow_float_copy: bool) -> GgufConversion:
    """Read `gguf`'s metadata (the tokenizer goes into `out`) and decide every tensor's
    format: `fmt` "auto" (each linear as NATIVE maps its type, int8 when the int4 kernel
    cannot take its shape, bfloat16 when neither can or it is stored as a float), or int8 /
    int4 for every linear. ModelError before any tensor is read when a type has no mapping
    (unless `allow_float_copy`), a tensor is missing or the architecture is unknown to gguf."""
    import gguf as gguf_pkg

    layout = read_gguf_layout(gguf)
    if fmt == "auto":
        check_types(gguf, allow_float_copy, announce=False)  # resolving --quant auto said the cost
    config = config_and_tokenizer(gguf, layout, out)
    spec = spec_from_config(config, gguf.stem, "bfloat16")
    arch = layout.architecture
    arch_id = {v: k for k, v in gguf_pkg.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise ModelError(
            f"GGUF architecture {arch!r} has no tensor names in the gguf package", "upgrade gguf"
        )
    _check_tensor_layout(arch)
    names = gguf_pkg.get_tensor_name_map(arch_id, spec.num_layers)
    linears = {f"{lin.name}.weight": lin for lin in spec.linears}
    fused = {name: x for x in spec.experts for name in x.tensors}
    formats: dict[str, tuple[str, int]] = {}
    expert_formats: dict[str, tuple] = {}
    jobs: list[_Job] = []
    copied: list[str] = []
    for name, shape in spec.tensors.items():
        if name in fused:  # a MoE layer's routed experts: expert by expert, at its first tensor
            x = fused[name]
            if name == x.gate_up_name:
                more, expert_formats[x.name], kept = _expert_jobs(
                    gguf, layout, x, fmt, group, allow_float_copy
                )
                jobs += more
                copied += kept
            continue
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        info = layout.tensors.get(f"{mapped}.{suffix}") if mapped else None
        if info is None:
            raise ModelError(
                f"GGUF file {gguf.name} lacks the tensor for {name}", "the file may be incomplete"
            )
        stored = None
        if tuple(info.shape) != tuple(shape):
            if tuple(shape) != (1, *info.shape):  # [1, H] stored [H]: the same values
                raise ModelError(
                    f"GGUF tensor {info.name} has shape {list(info.shape)}; "
                    f"the config says {list(shape)} for {name}",
                    "the file's metadata and tensors disagree; download it again",
                )
            stored = tuple(shape)
        kind = type_name(info.type_id)
        lin = linears.get(name)
        chosen = None
        if lin is not None:
            chosen = _linear_format(
                kind, lin.name, (lin.out_features, lin.in_features), fmt, group, allow_float_copy
            )
        if lin is not None and chosen is None and kind not in FLOAT_TYPES and fmt == "auto":
            copied.append(lin.name)
        if chosen is not None:
            formats[lin.name] = (chosen, group)
        order = None
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            order = _row_order(shape[0], spec.num_heads if "q_proj" in name else spec.num_kv_heads)
        minus_one = arch in NORM_PLUS_ONE and len(shape) == 1 and "norm" in base
        jobs.append(_Job(name, info, kind, chosen, order, minus_one, stored=stored))
    spec = spec.with_quant_map(formats).with_expert_quant(expert_formats)
    return GgufConversion(gguf, config, spec, jobs, group, fmt, tuple(copied))


def _expert_info(gguf: Path, layout, x: ExpertsSpec, part: str) -> GgufTensorInfo:
    """The 3-D GGUF tensor holding `part` of every expert of `x` (`blk.N.ffn_gate_exps`, ...);
    ModelError when it is missing or of another shape than [E, rows, inputs]."""
    info = expert_tensor(gguf, layout, x.layer_index, part, x.num_experts)
    name, what = info.name, f"the {part} weights of the {x.num_experts} experts in layer {x.layer_index}"
    want = (x.num_experts, *x.part_shape(part))
    if tuple(info.shape) != want:
        raise ModelError(
            f"GGUF tensor {name} has shape {list(info.shape)}; the config says {list(want)} ({what})",
            "the file's metadata and tensors disagree; download it again",
        )
    return info


def _expert_jobs(
    gguf: Path, layout, x: ExpertsSpec, fmt: str, group: int, allow_float_copy: bool
) -> tuple[list[_Job], tuple, list[str]]:
    """(one job per expert and part, in expert order; each part's (format, group) or None, ()
    when none is quantized; the parts float-copied from a type no format takes)."""
    infos = {part: _expert_info(gguf, layout, x, part) for part in PARTS}
    kinds = {part: type_name(info.type_id) for part, info in infos.items()}
    chosen = {
        p: _linear_format(kinds[p], f"{x.name}.{p}", x.part_shape(p), fmt, group, allow_float_copy)
        for p in PARTS
    }
    jobs = [
        _Job(
            quant_expert_key(x.name, e, p),
            infos[p],
            kinds[p],
            chosen[p],
            None,
            False,
            e * x.part_shape(p)[0],
            x.part_shape(p),
            True,
        )
        for e in range(x.num_experts)
        for p in PARTS
    ]
    stored = lambda f: None if f is None else (f, group if f == "int4" else quant.DEFAULT_GROUP_SIZE)  # noqa: E731
    formats = tuple(stored(chosen[p]) for p in PARTS)
    copied = [
        f"{x.name}.{p}" for p in PARTS if chosen[p] is None and kinds[p] not in FLOAT_TYPES and fmt == "auto"
    ]
    return jobs, formats if any(formats) else (), copied


def _check_tensor_layout(arch: str) -> None:
    """ModelError when transformers' GGUF loader changes this architecture's tensors in a way
    the converter does not repeat (it repeats LLaMA's q/k row order and Gemma's and
    Nemotron's norm offset, and reads Qwen MoE experts itself, expert by expert; others, such
    as gpt-oss's or MiniMax's experts or transposed GPT-2 weights, would load wrong)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
    except ImportError:
        return
    if arch in TENSOR_PROCESSORS and arch not in ("llama", "qwen2moe", "qwen3moe", *NORM_PLUS_ONE):
        raise ModelError(
            f"GGUF architecture {arch!r} stores tensors in a layout hetegen's converter does not handle",
            "pass a Hugging Face folder with safetensors weights",
        )


def _linear_format(
    kind: str, name: str, shape: tuple[int, int], fmt: str, group: int, allow_float_copy: bool
) -> str | None:
    """The format a linear (or an expert part) [out, in] stored as `kind` is written in (None:
    bfloat16)."""
    takes = lambda f: quant.kernel_takes(f, shape[0], shape[1], group)  # noqa: E731
    if fmt != "auto":
        return fmt if takes(fmt) else None
    native = NATIVE.get(kind)
    if native is None:
        if kind not in FLOAT_TYPES and not allow_float_copy:
            raise ModelError(f"linear {name} is stored as {kind}", f"pass {FLOAT_COPY_FLAG}")
        return None
    if native == "int4" and (group != quant.DEFAULT_GROUP_SIZE or not takes("int4")):
        native = "int8"  # the int4 kernel refuses the shape: int8 from the exact values
    return native if takes(native) else None


def _produce(conv: GgufConversion, counts: Counter, bar, task) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry, in order, one GGUF tensor at a time."""
    with open(conv.gguf, "rb") as handle:
        for job in conv.jobs:
            if job.fmt is None:
                yield from _bfloat16(handle, job, counts)
            else:
                w = _quantized(handle, job, conv.group, counts)
                yield f"{job.name}.q", w.q
                yield f"{job.name}.scale", w.scale
                if w.min is not None:
                    yield f"{job.name}.min", w.min
            bar.advance(task)


def _quantized(handle, job: _Job, group: int, counts: Counter) -> QuantWeight:
    out, inp = job.shape
    raw = torch.from_numpy(_read_rows(handle, job.info, job.row0, out))
    what = "experts_" if job.expert else "linears_"  # counted per expert part, or per linear
    try:
        if job.fmt == "int4" and (group != quant.DEFAULT_GROUP_SIZE or NATIVE.get(job.kind) != "int4"):
            w = quantize(dequantize_rows(job.kind, raw, inp), "int4", group)  # re-quantized: lossy
            counts[what + "requantized"] += 1
        else:
            w = to_quant_weight(job.kind, raw, out, inp, job.fmt)
            exact = job.fmt == "int4" and job.kind in EXACT_INT4
            counts[
                what + ("exact" if exact else "float16_rounded" if job.fmt == "int4" else "requantized")
            ] += 1
    except (ValueError, NotImplementedError) as exc:
        raise ModelError(
            f"cannot convert GGUF tensor {job.info.name} ({job.kind}): {exc}",
            "try --quant int8, or report the file's type",
        ) from exc
    return w.permute_rows(job.order) if job.order is not None else w


def _bfloat16(handle, job: _Job, counts: Counter) -> Iterator[tuple[str, torch.Tensor]]:
    """A tensor dequantized to bfloat16, a chunk of rows at a time (whole when its rows are
    permuted)."""
    shape = job.shape
    rows, inp = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    step = rows if job.order is not None else max(1, CHUNK_VALUES // inp)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        try:
            values = dequantize_rows(job.kind, _read_rows(handle, job.info, job.row0 + start, count), inp)
        except NotImplementedError as exc:
            raise ModelError(
                f"cannot dequantize GGUF tensor {job.info.name} ({job.kind}): {exc}",
                "upgrade the gguf package",
            ) from exc
        if job.minus_one:
            values = values - 1.0
        if job.order is not None:
            values = values[job.order]
        yield job.name, values.reshape((count, *shape[1:]) if len(shape) == 2 else shape).to(torch.bfloat16)


def write_gguf_quantized(
    gguf: Path,
    target: Path,
    fmt: str = "auto",
    group: int = quant.DEFAULT_GROUP_SIZE,
    *,
    allow_float_copy: bool = False,
) -> Path:
    """Convert `gguf` into the quantized folder `target`, atomically and tensor by tensor
    (models.formats.quantized.write_folder): `fmt` auto (each linear in its own format),
    int8 or int4. A file with no quantized linear left (every one a float copy) gives a
    plain bfloat16 folder."""
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-tokenizer-", dir=target.parent) as scratch:
        conv = plan_conversion(gguf, Path(scratch), fmt, group, allow_float_copy)
        counts: Counter = Counter()

        def doc() -> dict | None:
            if conv.spec.quant is None:
                return None  # every linear a float copy: a plain bfloat16 folder
            linears = {f"{lin.name}.weight" for lin in conv.spec.linears}
            source = {
                "gguf": str(gguf),
                "gguf_bytes": gguf.stat().st_size,
                "gguf_linear_types": dict(Counter(j.kind for j in conv.jobs if j.name in linears)),
                "linears_exact": counts["linears_exact"],
                "linears_float16_rounded": counts["linears_float16_rounded"],
                "linears_requantized": counts["linears_requantized"],
                "linears_float_copy": list(conv.float_copied),
            }
            if conv.spec.experts:  # counted per expert and part
                expert_tensors = {j.info.name: j.kind for j in conv.jobs if j.expert}
                source["gguf_expert_types"] = dict(Counter(expert_tensors.values()))
                for outcome in ("exact", "float16_rounded", "requantized"):
                    source[f"expert_parts_{outcome}"] = counts[f"experts_{outcome}"]
            reason = (
                f"stored as floats in the GGUF, dequantized with {FLOAT_COPY_FLAG}, or of a shape the "
                "CPU kernels cannot take (core.quant.kernel_takes)"
            )
            first = conv.spec.quant_formats[0]
            return quantization_doc(first, group, conv.spec, source, time.perf_counter() - start, reason)

        with progress(True) as bar:
            task = bar.add_task(f"Converting {gguf.name} ({conv.label})", total=len(conv.jobs))
            stream = TensorStream(conv.entries, lambda: _produce(conv, counts, bar, task))
            return write_folder(
                target,
                Path(scratch),
                conv.config,
                stream,
                doc,
                f"{gguf.name} ({conv.label})",
                patch_for_both_versions,
            )
