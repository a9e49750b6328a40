"""GGUF files straight into hetegen's quantized layout (models.shapes.quantfile), without an fp32 copy.

Q4_0 and Q4_1 linears map exactly onto int4 with groups of 32 (the same values, scales and
mins); Q8_0 linears are re-quantized per output channel from their exact values (torch's int8
kernel takes one scale per row). Linears in other GGUF types are dequantized one tensor at a
time and quantized to the target format. Everything else (embeddings, norms, a separate LM
head) is dequantized to bfloat16. LLaMA's q/k rows are stored permuted in GGUF; the rows are
put back in transformers' order (the permutation of transformers' own GGUF loader), which
only moves whole rows, so quantized rows move unchanged. Peak memory is the quantized model
plus one dequantized tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from hetegen_cli.core import paths, quant
from hetegen_cli.core.console import progress
from hetegen_cli.core.errors import HetegenError, ModelError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.architecture.build import quiet_transformers
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.formats.compat import patch_for_both_versions
from hetegen_cli.models.formats.quant import GGUF_BLOCK, QuantWeight, from_gguf_blocks, quantize
from hetegen_cli.models.formats.quantized import write_folder
from hetegen_cli.models.shapes.quantfile import quantization_doc

#: GGUF tensor types whose blocks map onto a hetegen format
DIRECT = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_linear_types(gguf: Path) -> Counter:
    """How many 2-D weight tensors of each GGUF type the file holds (metadata only).

    gguf's reader parses every metadata field on the way, a tokenizer's 147,238 parts for the
    default model: 4 s on every run. So the answer is kept in HETEGEN_HOME, keyed by the file's
    name, size and modification time, and read again only when the file changes."""
    cache = _meta_cache_path(gguf)
    if cache is not None:
        try:
            return Counter(json.loads(cache.read_text())["linear_types"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or damaged: read the file
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    counts = Counter(
        t.tensor_type.name for t in reader.tensors if len(t.shape) == 2 and "token_embd" not in t.name
    )
    if cache is not None:
        with contextlib.suppress(HetegenError):  # a read-only home: just not cached
            atomic_write(cache, json.dumps({"gguf": str(gguf), "linear_types": dict(counts)}))
    return counts


def _meta_cache_path(gguf: Path) -> Path | None:
    """Where gguf_linear_types keeps its answer for this version of the file (None: unknown)."""
    try:
        info = Path(gguf).stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{Path(gguf).resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()
    return paths.home() / "gguf-meta" / f"{key[:16]}.json"


def native_format(gguf: Path) -> str:
    """The hetegen format a GGUF's linears are in: int4 for Q4_0/Q4_1, int8 for Q8_0, else none."""
    counts = gguf_linear_types(gguf)
    if not counts:
        return "none"
    kind, _ = counts.most_common(1)[0]
    return DIRECT.get(kind, "none")


def _config_and_tokenizer(gguf: Path, out: Path) -> dict:
    """transformers reads the GGUF's metadata (no tensors): the config dict; the tokenizer is
    saved into `out`."""
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    except Exception as exc:
        raise ModelError(
            f"cannot read the metadata of GGUF file {gguf.name}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "check that it is a complete LLaMA/Mistral/Qwen2 GGUF file",
        ) from exc
    tokenizer.add_bos_token = False  # the GGUF says not to add BOS (docs/models.md)
    tokenizer.save_pretrained(out)
    doc = config.to_dict()
    doc.pop("quantization_config", None)
    return doc


def _row_order(out: int, heads: int) -> torch.Tensor:
    """GGUF -> transformers row order of a LLaMA q or k weight with `heads` heads."""
    dim = out // heads // 2
    return torch.arange(out).reshape(heads, dim, 2).transpose(1, 2).reshape(-1)


def _dequantized(tensor) -> torch.Tensor:
    """Any GGUF tensor as float32, in transformers' shape [rows, cols]."""
    from gguf import quants

    if tensor.tensor_type.name in FLOAT_TYPES:
        values = torch.from_numpy(tensor.data.copy()).to(torch.float32)
    else:
        values = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type)).to(torch.float32)
    shape = [int(d) for d in reversed(tensor.shape)]
    return values.reshape(shape)


def convert_gguf_quantized(gguf: Path, out: Path, fmt: str, group: int = quant.DEFAULT_GROUP_SIZE) -> tuple:
    """(config dict, tensors for model.safetensors, quantization document) of `gguf` in `fmt`;
    the tokenizer is written into `out`."""
    import gguf as gguf_pkg

    start = time.perf_counter()
    config = _config_and_tokenizer(gguf, out)
    spec = spec_from_config(config, gguf.stem, "bfloat16").quantized(fmt, group)
    reader = gguf_pkg.GGUFReader(str(gguf))
    arch = str(reader.fields["general.architecture"].contents())
    arch_id = {v: k for k, v in gguf_pkg.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_id is None:
        raise ModelError(f"GGUF architecture {arch!r} is not supported", "use a LLaMA, Mistral or Qwen2 GGUF")
    names = gguf_pkg.get_tensor_name_map(arch_id, spec.num_layers)
    stored = {t.name: t for t in reader.tensors}
    quantized = {f"{lin.name}.weight": lin for lin in spec.linears if lin.quant}
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    tensors: dict[str, torch.Tensor] = {}
    exact = requantized = 0
    with progress(True) as bar:
        task = bar.add_task(f"Converting {gguf.name} to {fmt}", total=len(spec.tensors))
        for name in spec.tensors:
            base, _, suffix = name.rpartition(".")
            mapped = names.get_name(base)
            tensor = stored.get(f"{mapped}.{suffix}") if mapped else None
            if tensor is None:
                raise ModelError(
                    f"GGUF file {gguf.name} lacks the tensor for {name}", "the file may be incomplete"
                )
            order = None
            if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                order = _row_order(spec.tensors[name][0], heads if "q_proj" in name else kv_heads)
            lin = quantized.get(name)
            if lin is None:
                value = _dequantized(tensor)
                tensors[name] = (value[order] if order is not None else value).to(torch.bfloat16)
            else:
                kind = tensor.tensor_type.name
                out_f, in_f = lin.out_features, lin.in_features
                if DIRECT.get(kind) == fmt and (fmt == "int8" or group == GGUF_BLOCK):
                    raw = torch.from_numpy(tensor.data.copy()).reshape(out_f, -1)
                    w: QuantWeight = from_gguf_blocks(kind, raw, out_f, in_f)
                    exact += kind != "Q8_0"
                    requantized += kind == "Q8_0"
                else:
                    w = quantize(_dequantized(tensor), fmt, group)
                    requantized += 1
                if order is not None:
                    w = w.permute_rows(order)
                tensors[f"{name}.q"], tensors[f"{name}.scale"] = w.q, w.scale
                if w.min is not None:
                    tensors[f"{name}.min"] = w.min
            bar.advance(task)
    source = {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "linears_exact": exact,
        "linears_requantized": requantized,
    }
    return config, tensors, quantization_doc(fmt, group, spec, source, time.perf_counter() - start)


def write_gguf_quantized(gguf: Path, target: Path, fmt: str, group: int = quant.DEFAULT_GROUP_SIZE) -> Path:
    """Convert `gguf` into the quantized folder `target`, atomically (models.formats.quantized)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-tokenizer-", dir=target.parent) as scratch:
        config, tensors, doc = convert_gguf_quantized(gguf, Path(scratch), fmt, group)
        return write_folder(
            target, Path(scratch), config, tensors, doc, f"{gguf.name} ({fmt})", patch_for_both_versions
        )
