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

import contextlib
import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetegen_cli.core import paths, quant
from hetegen_cli.core.console import note, progress
from hetegen_cli.core.errors import HetegenError, ModelError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.architecture.build import quiet_transformers
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.formats.compat import patch_for_both_versions
from hetegen_cli.models.formats.gguf import GgufLayout, GgufTensorInfo, read_gguf_layout
from hetegen_cli.models.formats.gguf_blocks import (
    CHUNK_VALUES,
    EXACT_INT4,
    FLOAT_TYPES,
    NATIVE,
    dequantize_rows,
    row_bytes,
    supported_types,
    to_quant_weight,
)
from hetegen_cli.models.formats.quant import QuantWeight, quantize
from hetegen_cli.models.formats.quantized import write_folder
from hetegen_cli.models.formats.stream_write import TensorEntry, TensorStream
from hetegen_cli.models.shapes.quantfile import quantization_doc
from hetegen_cli.models.shapes.spec import MIXED, ModelSpec

#: architectures whose norm weights GGUF stores plus one (transformers' Gemma2TensorProcessor)
NORM_PLUS_ONE = ("gemma2", "gemma3", "nemotron")
FLOAT_COPY_FLAG = "--allow-float-copy"


def _type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _is_block_linear(info: GgufTensorInfo) -> bool:
    return len(info.shape) == 2 and info.name.startswith("blk.") and info.name.endswith(".weight")


def gguf_linear_types(gguf: Path) -> Counter:
    """How many block linears (2-D `blk.*` weights) of each GGUF type the file holds
    (metadata only), kept in HETEGEN_HOME, keyed by the file's name, size and modification
    time, and read again only when the file changes."""
    cache = _meta_cache_path(gguf)
    if cache is not None:
        try:
            return Counter(json.loads(cache.read_text())["block_linear_types"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent, damaged or of an older hetegen: read the file
    layout = read_gguf_layout(gguf)
    counts = Counter(_type_name(t.type_id) for t in layout.tensors.values() if _is_block_linear(t))
    if cache is not None:
        with contextlib.suppress(HetegenError):  # a read-only home: just not cached
            atomic_write(cache, json.dumps({"gguf": str(gguf), "block_linear_types": dict(counts)}))
    return counts


def _meta_cache_path(gguf: Path) -> Path | None:
    """Where gguf_linear_types keeps its answer for this version of the file (None: unknown)."""
    try:
        info = Path(gguf).stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{Path(gguf).resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()
    return paths.home() / "gguf-meta" / f"{key[:16]}.json"


def unmapped_types(counts: Counter) -> list[str]:
    """The GGUF types among `counts` that no hetegen format takes (neither NATIVE nor float)."""
    return sorted(t for t in counts if t not in NATIVE and t not in FLOAT_TYPES)


def check_types(gguf: Path, allow_float_copy: bool = False, announce: bool = True) -> Counter:
    """The block linear types of `gguf`; ModelError naming the unmapped ones and the supported
    list, unless `allow_float_copy` (then a note says what their bfloat16 copy costs, unless
    `announce` is off: it was said already)."""
    counts = gguf_linear_types(gguf)
    unmapped = unmapped_types(counts)
    if not unmapped:
        return counts
    if not allow_float_copy:
        raise ModelError(
            f"GGUF file {gguf.name} stores linears as {', '.join(unmapped)}, which hetegen cannot load "
            "without a float copy",
            f"supported GGUF types: {', '.join(supported_types())}; pass {FLOAT_COPY_FLAG} to dequantize "
            "those linears to bfloat16 (the cost is printed first), --quant int8 to re-quantize them, or "
            "use a Q4_K_M / Q4_0 / Q8_0 file",
        )
    if not announce:
        return counts
    layout = read_gguf_layout(gguf)
    stored = copied = 0
    for t in layout.tensors.values():
        if _is_block_linear(t) and _type_name(t.type_id) in unmapped:
            stored += _tensor_bytes(t)
            copied += 2 * t.shape[0] * t.shape[1]
    count = sum(counts[t] for t in unmapped)
    note(
        f"{FLOAT_COPY_FLAG}: {count} linear{'s' if count != 1 else ''} in {', '.join(unmapped)} "
        f"({format_bytes(stored)} in the file) "
        f"will be dequantized to bfloat16: {format_bytes(copied)} on disk and in memory, "
        f"{copied / max(stored, 1):.1f}x their GGUF size"
    )
    return counts


def native_format(gguf: Path, allow_float_copy: bool = False) -> str:
    """The hetegen format a GGUF's linears load as: int4 (Q4_0/Q4_1/Q4_K), int8 (Q5_*/Q6_K/
    Q8_0), MIXED when both occur, "bfloat16" when every quantized linear is a float copy
    (`allow_float_copy`), "none" for a floating-point file. ModelError for unmapped types
    without `allow_float_copy` (check_types)."""
    counts = check_types(gguf, allow_float_copy)
    formats = sorted({NATIVE[t] for t in counts if t in NATIVE})
    if len(formats) > 1:
        return MIXED
    if formats:
        return formats[0]
    return "bfloat16" if unmapped_types(counts) else "none"


def _config_and_tokenizer(gguf: Path, layout: GgufLayout, out: Path) -> dict:
    """The config dict of a GGUF (gguf_config); the tokenizer and its chat template are saved
    into `out` (save_gguf_tokenizer)."""
    try:
        with quiet_transformers():
            config = gguf_config(gguf, layout)
    except Exception as exc:
        raise ModelError(
            f"cannot read the metadata of GGUF file {gguf.name}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "check that it is a complete GGUF file of a supported architecture",
        ) from exc
    save_gguf_tokenizer(gguf, out, layout)
    config.pop("quantization_config", None)
    return config


#: architectures whose config transformers' GGUF loader adjusts beyond its key mapping, or
#: builds another way: read through AutoConfig as they are
_CONFIG_BY_AUTOCONFIG = ("stablelm", "gpt-oss", "lfm2", "minimax-m2", "gemma4", "t5", "t5encoder")


def gguf_config(gguf: Path, layout: GgufLayout) -> dict:
    """transformers' config dict of a GGUF, built from the metadata hetegen's layout reader
    keeps, the way transformers' own loader builds it (modeling_gguf_pytorch_utils.
    load_gguf_checkpoint: its key mapping and defaults, the tied head when there is no
    output.weight, Gemma 3's text model, the vocabulary from the token count). transformers'
    AutoConfig parses every metadata array on the way, the tokenizer's too: 137 MB and 3.5 s
    for a 49,152-token vocabulary. Architectures it treats specially, and transformers
    without the mapping tables, go through AutoConfig (tested equal on real files)."""
    try:
        from transformers import CONFIG_MAPPING
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    except ImportError:
        GGUF_CONFIG_MAPPING = {}
    arch = layout.architecture
    if arch in _CONFIG_BY_AUTOCONFIG or arch not in GGUF_CONFIG_MAPPING:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        return config.to_dict()
    updated = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)
    if "llama" in arch and layout.metadata.get("general.name") == "mistral":
        updated = "mistral"
    config: dict = {
        "tie_word_embeddings": "output.weight" not in layout.tensors or arch in ("falcon", "bloom")
    }
    for key, value in (
        GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}
    ).items():
        config.setdefault(key, value)
    for key, value in layout.metadata.items():
        prefix, _, rest = key.replace(arch, updated).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest, -1)
        if target not in (-1, None):
            config[target] = value
    if config.get("model_type") == "gemma3":  # the GGUF holds the text backbone only
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in layout.array_lengths:
        config["vocab_size"] = layout.array_lengths["tokenizer.ggml.tokens"]
    doc = CONFIG_MAPPING[config["model_type"]].from_dict(config).to_dict()
    return {**doc, "_name_or_path": str(gguf.parent)}  # as AutoConfig names it


def save_gguf_tokenizer(gguf: Path, out: Path, layout: GgufLayout | None = None) -> None:
    """The tokenizer and chat template a GGUF carries, saved into `out` (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when the file has one), for any architecture:
    transformers 5's GGUF tokenizer reader builds it from the `tokenizer.*` metadata alone
    (no config, so an architecture whose config transformers cannot rebuild from a GGUF still
    gets its tokenizer); transformers 4 goes through AutoTokenizer. Whether to add BOS is what
    the file says (`tokenizer.ggml.add_bos_token`; transformers 4.x would add one anyway)."""
    layout = layout or read_gguf_layout(gguf)
    try:
        with quiet_transformers():
            tokenizer = _gguf_tokenizer(gguf)
    except Exception as exc:
        raise ModelError(
            f"cannot read the tokenizer of GGUF file {gguf.name}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "the file's tokenizer.* metadata may be missing or of a kind transformers cannot build",
        ) from exc
    add_bos = layout.metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        tokenizer.add_bos_token = bool(add_bos)
    template = layout.metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)


def _gguf_tokenizer(gguf: Path):
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    from transformers import PreTrainedTokenizerFast

    arch, tokens, config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(arch, tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def _row_order(out: int, heads: int) -> torch.Tensor:
    """GGUF -> transformers row order of a LLaMA q or k weight with `heads` heads."""
    dim = out // heads // 2
    return torch.arange(out).reshape(heads, dim, 2).transpose(1, 2).reshape(-1)


def _tensor_bytes(info: GgufTensorInfo) -> int:
    rows = 1
    for d in info.shape[:-1]:
        rows *= d
    return rows * row_bytes(_type_name(info.type_id), info.shape[-1])


def _read_rows(handle, info: GgufTensorInfo, start: int, count: int) -> np.ndarray:
    """Raw bytes of rows [start, start + count) of `info`: uint8 [count, row bytes], read
    into a fresh buffer (no memory map: what was read is freed with the array)."""
    per_row = row_bytes(_type_name(info.type_id), info.shape[-1])
    handle.seek(info.offset + start * per_row)
    data = bytearray(count * per_row)
    if handle.readinto(data) != len(data):
        raise ModelError(f"the GGUF file ends inside tensor {info.name}", "download the file again")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, per_row)


@dataclass(frozen=True)
class _Job:
    """One stored tensor: its transformers name, where it is in the GGUF, and how it is
    written (`fmt` int4/int8 for a quantized linear, None for bfloat16)."""

    name: str
    info: GgufTensorInfo
    kind: str
    fmt: str | None
    order: torch.Tensor | None = None
    minus_one: bool = False

    def entries(self, group: int) -> list[TensorEntry]:
        if self.fmt is None:
            return [TensorEntry(self.name, torch.bfloat16, self.info.shape)]
        out, inp = self.info.shape
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


def plan_conversion(
    gguf: Path,
    out: Path,
    fmt: str = "auto",
    group: int = quant.DEFAULT_GROUP_SIZE,
    *,
    allow_float_copy: bool = False,
) -> GgufConversion:
    """Read `gguf`'s metadata (the tokenizer goes into `out`) and decide every tensor's
    format: `fmt` "auto" (each linear as NATIVE maps its type, int8 when the int4 kernel
    cannot take its shape, bfloat16 when neither can or it is stored as a float), or int8 /
    int4 for every linear. ModelError before any tensor is read when a type has no mapping
    (unless `allow_float_copy`), a tensor is missing or the architecture is unknown to gguf."""
    import gguf as gguf_pkg

    layout = read_gguf_layout(gguf)
    if fmt == "auto":
        check_types(gguf, allow_float_copy, announce=False)  # resolving --quant auto said the cost
    config = _config_and_tokenizer(gguf, layout, out)
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
    formats: dict[str, tuple[str, int]] = {}
    jobs: list[_Job] = []
    copied: list[str] = []
    for name, shape in spec.tensors.items():
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        info = layout.tensors.get(f"{mapped}.{suffix}") if mapped else None
        if info is None:
            raise ModelError(
                f"GGUF file {gguf.name} lacks the tensor for {name}", "the file may be incomplete"
            )
        if tuple(info.shape) != tuple(shape):
            raise ModelError(
                f"GGUF tensor {info.name} has shape {list(info.shape)}; "
                f"the config says {list(shape)} for {name}",
                "the file's metadata and tensors disagree; download it again",
            )
        kind = _type_name(info.type_id)
        lin = linears.get(name)
        chosen = _linear_format(kind, lin, fmt, group, allow_float_copy) if lin is not None else None
        if lin is not None and chosen is None and kind not in FLOAT_TYPES and fmt == "auto":
            copied.append(lin.name)
        if chosen is not None:
            formats[lin.name] = (chosen, group)
        order = None
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            order = _row_order(shape[0], spec.num_heads if "q_proj" in name else spec.num_kv_heads)
        minus_one = arch in NORM_PLUS_ONE and len(shape) == 1 and "norm" in base
        jobs.append(_Job(name, info, kind, chosen, order, minus_one))
    return GgufConversion(gguf, config, spec.with_quant_map(formats), jobs, group, fmt, tuple(copied))


def _check_tensor_layout(arch: str) -> None:
    """ModelError when transformers' GGUF loader changes this architecture's tensors in a way
    the converter does not repeat (it repeats LLaMA's q/k row order and Gemma's and
    Nemotron's norm offset; others, such as merged experts or transposed GPT-2 weights, would
    load wrong)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS
    except ImportError:
        return
    if arch in TENSOR_PROCESSORS and arch not in ("llama", *NORM_PLUS_ONE):
        raise ModelError(
            f"GGUF architecture {arch!r} stores tensors in a layout hetegen's converter does not handle",
            "pass a Hugging Face folder with safetensors weights",
        )


def _linear_format(kind: str, lin, fmt: str, group: int, allow_float_copy: bool) -> str | None:
    """The format a linear stored as `kind` is written in (None: bfloat16)."""
    takes = lambda f: quant.kernel_takes(f, lin.out_features, lin.in_features, group)  # noqa: E731
    if fmt != "auto":
        return fmt if takes(fmt) else None
    native = NATIVE.get(kind)
    if native is None:
        if kind not in FLOAT_TYPES and not allow_float_copy:
            raise ModelError(f"linear {lin.name} is stored as {kind}", f"pass {FLOAT_COPY_FLAG}")
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
    out, inp = job.info.shape
    raw = torch.from_numpy(_read_rows(handle, job.info, 0, out))
    try:
        if job.fmt == "int4" and (group != quant.DEFAULT_GROUP_SIZE or NATIVE.get(job.kind) != "int4"):
            w = quantize(dequantize_rows(job.kind, raw, inp), "int4", group)  # re-quantized: lossy
            counts["requantized"] += 1
        else:
            w = to_quant_weight(job.kind, raw, out, inp, job.fmt)
            exact = job.fmt == "int4" and job.kind in EXACT_INT4
            counts["exact" if exact else "float16_rounded" if job.fmt == "int4" else "requantized"] += 1
    except (ValueError, NotImplementedError) as exc:
        raise ModelError(
            f"cannot convert GGUF tensor {job.info.name} ({job.kind}): {exc}",
            "try --quant int8, or report the file's type",
        ) from exc
    return w.permute_rows(job.order) if job.order is not None else w


def _bfloat16(handle, job: _Job, counts: Counter) -> Iterator[tuple[str, torch.Tensor]]:
    """A tensor dequantized to bfloat16, a chunk of rows at a time (whole when its rows are
    permuted)."""
    shape = job.info.shape
    rows, inp = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    step = rows if job.order is not None else max(1, CHUNK_VALUES // inp)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        try:
            values = dequantize_rows(job.kind, _read_rows(handle, job.info, start, count), inp)
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
        conv = plan_conversion(gguf, Path(scratch), fmt, group, allow_float_copy=allow_float_copy)
        counts: Counter = Counter()

        def doc() -> dict | None:
            if conv.spec.quant is None:
                return None  # every linear a float copy: a plain bfloat16 folder
            linears = {f"{lin.name}.weight" for lin in conv.spec.linears}
            source = {
                "gguf": str(gguf),
                "gguf_bytes": gguf.stat().st_size,
                "gguf_linear_types": dict(Counter(j.kind for j in conv.jobs if j.name in linears)),
                "linears_exact": counts["exact"],
                "linears_float16_rounded": counts["float16_rounded"],
                "linears_requantized": counts["requantized"],
                "linears_float_copy": list(conv.float_copied),
            }
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
