"""Quantized model folders: hetegen's own safetensors layout, made once (loaded fast by
models.loading.quantized_loader).

A quantized folder is a Hugging Face folder (config.json, tokenizer files) whose
`model.safetensors` stores every quantized linear `X` as `X.weight.q`, `X.weight.scale` and,
for int4, `X.weight.min` (models.formats.quant's layout), and every other tensor in bfloat16 (the
activations the packed kernels take). A MoE model's routed experts are stored one by one, each
part in that layout under models.shapes.experts.quant_expert_key (`{experts}.{e}.gate_proj.
weight.q`, ...), so each expert is a unit the planner places. `quantization.json` says which
format, which linears and which experts' parts. Linears and expert parts a kernel cannot take
(core.quant.kernel_takes) and the LM head stay bfloat16.

`ensure_quantized(ref, format)` makes (once) and returns the quantized copy of a float model
under $HETEGEN_HOME/models; models.formats.gguf writes the same layout straight from Q4_0/Q4_1/Q8_0
GGUF blocks. `read_quant_weight` reads one quantized linear back from a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetegen_cli.core import paths, quant
from hetegen_cli.core.console import activity, note, progress
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantWeight, quantize
from hetegen_cli.models.formats.quant_experts import copy_float_expert
from hetegen_cli.models.formats.stream_write import TensorStream, write_safetensors
from hetegen_cli.models.shapes.experts import PARTS, quant_expert_key
from hetegen_cli.models.shapes.quantfile import (
    QUANT_FILE,
    REST_DTYPE,
    linear_formats,
    made_quantized,
    quantization_doc,
    quantized_folder_name,
)

_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def read_quant_weight(reader: CheckpointReader, name: str, doc: dict) -> QuantWeight:
    """Quantized linear `name` from a quantized folder, in its own format (a mixed folder's
    linears differ: models.shapes.quantfile.linear_formats)."""
    fmt, group = linear_formats(doc)[name]
    get = lambda part: reader.raw(f"{name}.weight.{part}")  # noqa: E731
    q, scale = get("q"), get("scale")
    out, cols = q.shape
    if fmt == "int8":
        return QuantWeight("int8", out, cols, q, scale)
    return QuantWeight("int4", out, cols * 2, q, scale, get("min"), int(group))


# --- writing ---------------------------------------------------------------------------


def write_folder(
    target: Path,
    source: Path | None,
    config: dict,
    tensors: dict[str, torch.Tensor] | TensorStream,
    doc: dict | Callable[[], dict | None],
    label: str,
    after: Callable[[Path], None] | None = None,
) -> Path:
    """Write a quantized folder into `target` atomically (a temporary sibling, then a rename):
    config.json (dtype bfloat16), model.safetensors, quantization.json, and the tokenizer and
    generation files of `source` (or what `after(tmp)` writes there). `tensors` is a dict or a
    TensorStream written tensor by tensor as it is produced (models.formats.stream_write);
    `doc` may be a function called once the tensors are written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        config = {**config, "torch_dtype": REST_DTYPE}
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if source is not None:
            for name in _COPIED:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        if after is not None:
            after(tmp)
        stream = tensors if isinstance(tensors, TensorStream) else TensorStream.of(tensors)
        with activity(f"writing {label}"):
            write_safetensors(tmp / "model.safetensors", stream.entries, stream.produce())
        document = doc() if callable(doc) else doc
        if document is not None:  # None: a floating-point folder after all
            (tmp / QUANT_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ModelError(
                f"writing {label} into {target} failed: {exc.strerror or exc}",
                "free disk space or set HETEGEN_HOME to another folder",
            ) from exc
        raise
    return target


def quantize_folder(ref: Any, fmt: str, group: int, target: Path) -> Path:
    """Quantize the float model `ref` (a ModelRef with a local folder) into `target`."""
    spec = ref.spec.quantized(fmt, group)
    start = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    qnames = {f"{lin.name}.weight": lin for lin in spec.linears if lin.quant}
    fused = {name for x in spec.experts for name in x.tensors}
    with CheckpointReader(Path(ref.path)) as reader, progress(True) as bar:
        total = len(spec.tensors) - len(fused) + sum(x.num_experts for x in spec.experts)
        task = bar.add_task(f"Quantizing {ref.name} to {fmt}", total=total)
        for name in spec.tensors:
            if name in fused:
                continue  # the routed experts: below, one by one
            key = reader.key_for(name)
            if key is None:
                raise ModelError(f"the checkpoint lacks {name}", "re-download or convert the model")
            lin = qnames.get(name)
            if lin is None:
                tensors[name] = reader.read(key, torch.bfloat16, torch.device("cpu"))
            else:
                w = reader.read(key, torch.float32, torch.device("cpu"))
                _put(tensors, name, quantize(w, fmt, group))
            bar.advance(task)
        for x in spec.experts:
            i = x.intermediate_size
            for e in range(x.num_experts):
                gate_up = torch.empty((2 * i, x.hidden_size), dtype=torch.float32)
                down = torch.empty((x.hidden_size, i), dtype=torch.float32)
                copy_float_expert(reader, x, e, gate_up, down)
                for part, w in zip(PARTS, (gate_up[:i], gate_up[i:], down), strict=True):
                    key, q = quant_expert_key(x.name, e, part), x.part_format(part)
                    if q is None:
                        tensors[key] = w.to(torch.bfloat16)
                    else:
                        _put(tensors, key, quantize(w, *q))
                bar.advance(task)
    config = json.loads((Path(ref.path) / "config.json").read_text(encoding="utf-8"))
    doc = quantization_doc(
        fmt, group, spec, {"folder": str(ref.path), "name": ref.name}, time.perf_counter() - start
    )
    return write_folder(target, Path(ref.path), config, tensors, doc, f"{ref.name} ({fmt})")


def _put(tensors: dict[str, torch.Tensor], name: str, w: QuantWeight) -> None:
    """Quantized weight `name` ("X.weight") as its stored parts."""
    tensors[f"{name}.q"], tensors[f"{name}.scale"] = w.q, w.scale
    if w.min is not None:
        tensors[f"{name}.min"] = w.min


def ensure_quantized(
    ref: Any, fmt: str, group: int = quant.DEFAULT_GROUP_SIZE, output: Path | None = None
) -> Path:
    """The folder of `ref` quantized to `fmt` (made once, under $HETEGEN_HOME/models unless
    `output` is given); `ref` itself when it is already in that format."""
    made = made_quantized(Path(ref.path), ref.name, fmt, group, output)
    if made is not None:
        return made
    target = output or paths.models_dir() / quantized_folder_name(ref.name, fmt, group)
    note(
        f"Quantizing {ref.name} to {fmt}"
        + (f" (groups of {group})" if fmt == "int4" else "")
        + f", once, into {target}"
    )
    start = time.perf_counter()
    quantize_folder(ref, fmt, group, target)
    size = sum(f.stat().st_size for f in target.iterdir())
    note(f"Quantized in {time.perf_counter() - start:.1f} s ({format_bytes(size)})")
    return target
