"""Synthetic LLaMA-family models written as quantized GGUF files that llama.cpp and hetegen
both read (`bench --synthetic PRESET --synthetic-format gguf-q4_0`); and tiny
mixture-of-experts files (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: models.formats.gguf_write_moe)
for tests, their routed experts one 3-D tensor per part and layer in `expert_qtype`.

One file is the model for both sides: llama.cpp runs it as it is; hetegen converts it once
into its int4/int8 layout (models.formats.gguf_quant: Q4_0/Q4_1 blocks map onto int4 exactly). What
is written, per tensor (GGUF names, the layout of llama.cpp's `convert_hf_to_gguf.py`):

- the linears (`blk.N.attn_q/k/v/output`, `ffn_gate/up/down`) in the chosen type: Q4_0, Q4_1
  or Q8_0 (blocks of 32 inputs, `gguf.quants.quantize`); or `Q4_K_M`, llama-quantize's mix
  (`q4_k_m_type`): Q4_K for most linears, Q6_K for attn_v and ffn_down in the layers its
  `use_more_bits` picks (the first and last eighth and every third between: about half),
  the token embedding Q6_K when it is also the head (else Q4_K) and an untied head Q6_K; a
  tensor whose rows are not a multiple of 256 falls back as llama-quantize's does (Q4_K to
  Q5_0, Q6_K to Q8_0). Q4_K and Q6_K blocks come from models.formats.gguf_blocks' encoders
  (`gguf` cannot quantize K types);
- the norms in F32;
- for Q4_0/Q4_1/Q8_0 files, the token embedding, and a separate `output` head when the preset's
  head is untied, in Q8_0 (what the default model's GGUF holds);
- q/k rows permuted as llama.cpp's converter permutes them (hetegen's reader puts them back);
- `llama.*` hyperparameters from the preset's config, and the tokenizer (`tokenizer.*`)
  copied from the default model's GGUF (SmolLM2's, 49,152 tokens: the vocabulary must match).

Weights are random from a seed (models.formats.synthetic's RandomPool: matrices ~ N(0, 0.02), norm
weights ~ 1 + N(0, 0.02)), generated in transformers' layout; `synthetic_weights` yields the
same values, so a test can build the float model the file quantizes. Written tensor by tensor
(peak RAM: one float32 tensor and its blocks) into a temporary file renamed at the end.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetegen_cli.core.console import activity, note
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.formats.gguf import default_gguf_path
from hetegen_cli.models.formats.gguf_blocks import quantize_q4_k, quantize_q6_k
from hetegen_cli.models.formats.gguf_write_moe import (
    EXPERT_TYPES,
    MOE_GGUF_ARCHS,
    add_moe_metadata,
    expert_tensors,
    gguf_arch,
    is_router,
    part_values,
)
from hetegen_cli.models.formats.synthetic import RandomPool, random_tensor, tensor_shapes
from hetegen_cli.models.shapes import presets

#: --synthetic-format values that write a GGUF -> the GGUF type of the linears (Q4_K_M: a mix)
GGUF_FORMATS = {"gguf-q4_0": "Q4_0", "gguf-q4_1": "Q4_1", "gguf-q8_0": "Q8_0", "gguf-q4_k_m": "Q4_K_M"}
#: the GGUF type written for each hetegen format when --quant asks for one
EMBEDDING_TYPE = "Q8_0"  # token embedding and a separate output head
GGUF_MODEL_TYPES = ("llama", *MOE_GGUF_ARCHS)  # config model_type values this module writes
TOKENIZER_VOCAB = 49152  # tokens of the default model's tokenizer, copied into every file
_FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15}  # gguf.LlamaFileType.MOSTLY_*
_BLOCK = 32  # inputs per block of Q4_0, Q4_1, Q5_0 and Q8_0
#: llama-quantize's fallback for a tensor whose rows are not a multiple of 256 (a K-quant
#: super-block): llama_tensor_get_type's `convert_incompatible_tensor`
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
WEIGHT_STD = 0.02  # RandomPool's matrices


@dataclass(frozen=True)
class GgufTensor:
    """One tensor to write: transformers name and shape [rows, cols] (or [n]), GGUF name and
    type, and for q/k weights the head count their rows are permuted by."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: str  # F32, Q4_0, Q4_1, Q8_0; in a Q4_K_M file also Q4_K, Q6_K, Q5_0
    permute_heads: int | None = None
    part: str | None = None  # the half of transformers' fused gate_up_proj: gate or up

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        count = 1
        for dim in self.shape:
            count *= dim
        return count // block * size


def gguf_preset_error(preset: str) -> str | None:
    """Why `preset` cannot be written as GGUF (its architecture or its vocabulary), or None."""
    config = presets.preset_config(preset)
    model_type = config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        return (
            f"synthetic GGUF files are written for LLaMA-family presets only "
            f"({preset} is model_type {model_type!r})"
        )
    if int(config.get("vocab_size") or 0) < TOKENIZER_VOCAB:
        return (
            f"synthetic GGUF files carry SmolLM2's tokenizer ({TOKENIZER_VOCAB} tokens, padded to "
            f"a larger vocabulary); {preset} has a vocabulary of {config.get('vocab_size')}"
        )
    return None


def padded_tokenizer(fields: list[tuple[str, Any, Any, Any]], vocab: int) -> list[tuple[str, Any, Any, Any]]:
    """The `tokenizer.*` fields with the token list padded to `vocab` tokens by unused tokens
    (`<|hetegen_pad_N|>`, type UNUSED, score 0): a preset whose vocabulary is larger than the
    tokenizer's gets every id a token, as a real model's padded vocabulary does. The merges
    and the existing ids are unchanged."""
    count = _token_count(fields) or 0
    if vocab <= count:
        return fields
    extra = vocab - count
    pad = {
        "tokenizer.ggml.tokens": [f"<|hetegen_pad_{i}|>" for i in range(extra)],
        "tokenizer.ggml.token_type": [5] * extra,  # gguf.TokenType.UNUSED
        "tokenizer.ggml.scores": [0.0] * extra,
    }
    return [(k, list(v) + pad[k] if k in pad else v, t, s) for k, v, t, s in fields]


def llama_gguf_rows(out: int, heads: int) -> torch.Tensor:
    """transformers -> GGUF row order of a LLaMA q or k weight [out, in] with `heads` heads
    (convert_hf_to_gguf's `permute`: per head, the two rotary halves interleaved)."""
    dim = out // heads // 2
    return torch.arange(out).reshape(heads, 2, dim).transpose(1, 2).reshape(-1)


def use_more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's choice of the layers whose attn_v and ffn_down get more bits in
    Q4_K_M: the first and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m_type(gguf_name: str, shape: tuple[int, ...], layers: int, tied: bool) -> str:
    """The GGUF type llama-quantize's Q4_K_M gives a 2-D tensor (module docstring)."""
    base = gguf_name.rsplit(".", 1)[0]
    head = base == "output" or (base == "token_embd" and tied)
    more = base.endswith((".attn_v", ".ffn_down")) and use_more_bits(int(base.split(".")[1]), layers)
    kind = "Q6_K" if head or more else "Q4_K"
    return K_FALLBACK[kind] if shape[-1] % 256 else kind


def tensor_plan(config: dict[str, Any], qtype: str, expert_qtype: str | None = None) -> list[GgufTensor]:
    """Every tensor of a LLaMA or MoE `config` as written with linears in `qtype` (or the
    Q4_K_M mix, LLaMA only) and a MoE model's routed experts in `expert_qtype` (default
    `qtype`), in module order (models.formats.gguf_write_moe: one tensor per part and layer).

    ModelError for another architecture, an unwritable type or shapes the blocks cannot take.
    """
    import gguf

    model_type = config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        raise ModelError(
            f"synthetic GGUF files are written for LLaMA-family and mixture-of-experts "
            f"({', '.join(MOE_GGUF_ARCHS)}) models, not {model_type!r}",
            "use a LLaMA-family config",
        )
    moe = model_type in MOE_GGUF_ARCHS
    if qtype not in _FILE_TYPES or (moe and qtype == "Q4_K_M"):
        raise ModelError(f"cannot write GGUF type {qtype!r}", "use Q4_0, Q4_1, Q8_0 or Q4_K_M (LLaMA)")
    expert_qtype = expert_qtype or qtype
    if moe and expert_qtype not in EXPERT_TYPES:
        raise ModelError(
            f"cannot write experts as GGUF type {expert_qtype!r}", f"use {', '.join(EXPERT_TYPES)}"
        )
    arch = gguf_arch(model_type)
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    layers = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], layers)
    plan = []
    for name, shape in tensor_shapes(config):
        experts = expert_tensors(name, tuple(shape))
        if experts is not None:
            for gguf_name, part_shape, part in experts:
                _check_blocks(name, part_shape, expert_qtype)
                plan.append(GgufTensor(name, gguf_name, part_shape, expert_qtype, part=part))
            continue
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None or suffix not in ("weight", "bias"):
            raise ModelError(
                f"no GGUF name for {name}", "synthetic GGUF files hold LLaMA and MoE weights only"
            )
        if len(shape) == 1 or is_router(name):
            kind = "F32"
        elif qtype == "Q4_K_M":
            kind = q4_k_m_type(f"{mapped}.{suffix}", tuple(shape), layers, tied)
        elif base in ("model.embed_tokens", "lm_head"):
            kind = EMBEDDING_TYPE
        else:
            kind = qtype
        _check_blocks(name, tuple(shape), kind)
        permute = None
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            permute = heads
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            permute = kv_heads
        if name.endswith(".shared_expert_gate.weight"):
            shape = shape[1:]  # [1, H] stored [H], as llama.cpp's converter writes it
        plan.append(GgufTensor(name, f"{mapped}.{suffix}", tuple(shape), kind, permute))
    return plan


def _check_blocks(name: str, shape: tuple[int, ...], kind: str) -> None:
    block = 256 if kind.endswith("_K") else _BLOCK
    if kind != "F32" and shape[-1] % block:
        raise ModelError(
            f"{name} has {shape[-1]} inputs, not a multiple of {block} ({kind} blocks)",
            f"choose hidden and intermediate sizes that are multiples of {block}",
        )


def quantize_blocks(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 [rows, cols] -> GGUF blocks of `kind` (uint8 [rows, row bytes]): gguf's own
    quantizer, or models.formats.gguf_blocks' encoder for Q4_K and Q6_K."""
    from gguf import GGMLQuantizationType, quants

    encode = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}.get(kind)
    if encode is None:
        return quants.quantize(values, GGMLQuantizationType[kind])
    rows = max(1, (1 << 22) // values.shape[1])  # 16 MiB of float32 at a time
    return np.concatenate([encode(values[r : r + rows]) for r in range(0, values.shape[0], rows)])


def synthetic_weights(
    config: dict[str, Any], seed: int = 0, std: float = WEIGHT_STD
) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) of every stored tensor, random from `seed`, in
    module order: the float model that `write_llama_gguf` quantizes. Matrices ~ N(0, std),
    norm weights ~ 1 + N(0, 0.02)."""
    pool = RandomPool(torch.Generator().manual_seed(seed), torch.float32)
    for name, shape in tensor_shapes(config):
        values = random_tensor(name, shape, pool)
        yield name, values if len(shape) == 1 or std == WEIGHT_STD else values * (std / WEIGHT_STD)


def tokenizer_fields(gguf_path: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, GGUF value type, array item type) of every `tokenizer.*` key of a GGUF
    (read once per file version: parsing SmolLM2's 49,152 tokens takes ~2 s)."""
    stat = Path(gguf_path).stat()
    return list(_tokenizer_fields(str(gguf_path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, Any, Any, Any], ...]:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    return tuple(fields)


def _token_count(fields: list[tuple[str, Any, Any, Any]]) -> int | None:
    for key, value, _, _ in fields:
        if key == "tokenizer.ggml.tokens":
            return len(value)
    return None


def write_llama_gguf(
    config: dict[str, Any],
    path: Path,
    qtype: str = "Q4_0",
    *,
    seed: int = 0,
    std: float = WEIGHT_STD,
    tokenizer_gguf: Path | None = None,
    name: str = "synthetic",
    progress: Any = None,
    expert_qtype: str | None = None,
) -> Path:
    """Write a random LLaMA or mixture-of-experts model of `config` as a GGUF file at `path`
    (see the module docstring; the experts of a MoE model in `expert_qtype`, default `qtype`),
    atomically; returns `path`. `std` scales the matrices (tests use larger weights so
    attention is far from uniform). `tokenizer_gguf` (default: the default model's GGUF)
    supplies the tokenizer, whose token count must be at most `config["vocab_size"]` (it is
    padded to it: padded_tokenizer)."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    plan = tensor_plan(config, qtype, expert_qtype)
    vocab = int(config["vocab_size"])
    fields = padded_tokenizer(tokenizer_fields(tokenizer_gguf or default_gguf_path()), vocab)
    if _token_count(fields) != vocab:
        raise ModelError(
            f"the tokenizer has {_token_count(fields)} tokens, the model's vocabulary {vocab}",
            "use a preset with the SmolLM2 vocabulary (49152), or pass a tokenizer GGUF that matches",
        )
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf_arch(config["model_type"]))
    writer.add_name(f"hetegen {name}")
    writer.add_description(
        f"hetegen synthetic {name}: random weights (seed {seed}, std {std}), not a trained model"
    )
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(vocab)
    add_moe_metadata(writer, config)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub)
    for t in plan:
        if t.qtype == "F32":
            writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes)
        else:
            kind = GGMLQuantizationType[t.qtype]
            byte_shape = quants.quant_shape_to_byte_shape(t.shape, kind)
            writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=kind)
    total = sum(t.nbytes for t in plan)
    task = progress.add_task(f"writing {name} as GGUF {qtype}", total=total) if progress else None
    try:
        with activity(f"writing {name} as GGUF"):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            pending = iter(plan)  # in module order; a fused expert tensor is two in a row
            t = next(pending, None)
            for hf_name, weights in synthetic_weights(config, seed, std):
                while t is not None and t.hf_name == hf_name:
                    values = part_values(weights, t.part).reshape(t.shape)
                    if t.permute_heads is not None:
                        values = values[llama_gguf_rows(t.shape[0], t.permute_heads)]
                    array = values.contiguous().numpy()
                    if t.qtype != "F32":
                        rows = quantize_blocks(array.reshape(-1, t.shape[-1]), t.qtype)
                        array = rows.reshape(
                            quants.quant_shape_to_byte_shape(t.shape, GGMLQuantizationType[t.qtype])
                        )
                    writer.write_tensor_data(array)
                    if progress:
                        progress.advance(task, t.nbytes)
                    t = next(pending, None)
            assert t is None, f"{t.hf_name} was not written"
            writer.flush()
            os.fsync(writer.fout[0].fileno())
            writer.close()
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ModelError(
                f"writing {path} failed: {exc.strerror or exc}",
                "free disk space or set HETEGEN_HOME to another folder",
            ) from exc
        raise
    return path


def _clean_stale_partials(path: Path) -> None:
    """Remove temporary files of writes into `path` whose process has died."""
    for partial in path.parent.glob(f".{path.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[-1]), 0)
        except ProcessLookupError:
            partial.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


def synthetic_gguf_path(preset: str, qtype: str, seed: int, root: Path) -> Path:
    """Where the synthetic GGUF of `preset` with `qtype` linears and `seed` is cached."""
    return root / f"synthetic-{preset}-{qtype.lower()}-seed{seed}.gguf"


def build_synthetic_gguf(preset: str, qtype: str, root: Path, seed: int = 0, progress: Any = None) -> Path:
    """The synthetic GGUF of `preset` under `root`, written once (reused when present)."""
    import shutil

    if preset not in presets.PRESETS:
        raise ModelError(
            f"unknown preset {preset!r} for --synthetic", "known: " + ", ".join(presets.preset_names())
        )
    why = gguf_preset_error(preset)
    if why:
        raise ModelError(why, "use a smollm2-* preset, or --synthetic-format safetensors")
    path = synthetic_gguf_path(preset, qtype, seed, root)
    if path.is_file():
        return path
    config = presets.preset_config(preset)
    total = sum(t.nbytes for t in tensor_plan(config, qtype))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < total * 1.05:
        raise ModelError(
            f"not enough disk for a synthetic {preset} GGUF: needs {format_bytes(total)}, "
            f"{format_bytes(free)} free under {root}",
            "set HETEGEN_HOME to a larger disk",
        )
    note(f"Writing a synthetic {preset} as GGUF {qtype} ({format_bytes(total)}), once, to {path}")
    return write_llama_gguf(config, path, qtype, seed=seed, name=preset, progress=progress)
