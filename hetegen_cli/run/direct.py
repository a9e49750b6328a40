"""`hetegen run` without torch or transformers: a direct start (docs/run.md, "Direct start").

Importing torch and transformers' model code is most of a cold `hetegen run` on a small
model. A quantized model whose every decode step hetegen fuses needs neither at one token:
models.formats.direct runs its steps from the files with numpy and hetegen's kernels. The
first regular run of such a model checks the direct path against the model it loaded and
keeps a record (run.direct_check) in $HETEGEN_HOME/direct; later greedy runs that the record
covers start here, import neither, feed the prompt one token at a time through the decode
steps and generate the same way run.generate does. Anything else (no record, files changed
since, --chat, sampling, a plan, a GPU, a prompt over MAX_PROMPT_TOKENS) returns None and the
regular path runs. `HETEGEN_DIRECT=off` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hetegen_cli import __version__
from hetegen_cli.core import paths
from hetegen_cli.core.console import activity, note
from hetegen_cli.core.errors import InputError, ModelError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import direct, kernel_lib
from hetegen_cli.models.loading.source import ModelRef, resolve_model
from hetegen_cli.run.document import process_age_s, run_document, wall_split
from hetegen_cli.run.setup import GenerationRequest, ModelSetup
from hetegen_cli.run.text import (
    GenerationResult,
    GenerationTimings,
    IncrementalDecoder,
    TextCallback,
    prepare_prompt,
)

ENV = "HETEGEN_DIRECT"  # "auto" (default) or "off"
RECORD_KIND = "hetegen.direct"
RECORD_VERSION = 1
#: longest prompt fed through decode steps one token at a time: the regular path's batched
#: prefill is several times faster per token, so past this the imports it costs pay back
MAX_PROMPT_TOKENS = 128


class Words:
    """A tokenizer rebuilt with the `tokenizers` library from the JSON transformers' fast
    tokenizer holds, answering the calls run.text makes: `words(text)["input_ids"]` and
    `decode(ids, skip_special_tokens=...)` (with transformers' clean-up of spaces when
    `clean`)."""

    chat_template = None

    def __init__(self, spec: str, clean: bool) -> None:
        from tokenizers import Tokenizer

        self.tokenizer, self.clean = Tokenizer.from_str(spec), clean

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.tokenizer.encode(text).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean else text


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(a, b)
    for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# ---------------------------------------------------------------------------- the record


def record_path(folder: Path) -> Path:
    """Where the record of the model in `folder` lives: $HETEGEN_HOME/direct/<hash>.json."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return paths.home() / "direct" / f"{key}.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def depends(folder: Path) -> dict[str, Any]:
    """What a record holds only while it is unchanged: the folder's files (size, time), the
    kernel library, and the versions of hetegen and of the packages on either side."""
    files = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file():
            info = entry.stat()
            files[entry.name] = [info.st_size, info.st_mtime_ns]
    packages = ("numpy", "tokenizers", "torch", "transformers")
    return {
        "files": files,
        "kernels": kernel_lib.library_path().name,
        "versions": {"hetegen": __version__, **{p: _version(p) for p in packages}},
        "layout": direct.LAYOUT_VERSION,
    }


def extra_path(folder: Path) -> Path:
    """Where the record of `folder` keeps tensors made at load (beside the record)."""
    return record_path(folder).with_suffix(".safetensors")


def _stamp(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def current_record(folder: Path) -> dict[str, Any] | None:
    """The record of `folder` when there is one and nothing it depends on changed, else None."""
    doc = direct.read_layout(record_path(folder))
    if doc is None or doc.get("kind") != RECORD_KIND or doc.get("schema_version") != RECORD_VERSION:
        return None
    if doc.get("folder") != str(folder.resolve()) or doc.get("depends") != depends(folder):
        return None
    if doc.get("extra") is not None and doc["extra"] != _stamp(extra_path(folder)):
        return None
    return doc


def extra_files(folder: Path, record: dict[str, Any]) -> tuple[Path, ...]:
    return (extra_path(folder),) if record.get("extra") is not None else ()


def write_record(
    folder: Path,
    layout: dict[str, Any] | None,
    tokenizer: str,
    clean: bool,
    eos: list[int],
    extra: Path | None,
    checked: dict[str, Any],
) -> Path:
    """Write the record of `folder` (through a temporary file renamed into place), after the
    `extra` tensors file it names, if any. `layout` None: the check refused the direct path
    (`checked["refused"]` says why), which stays refused until something it depends on changes."""
    doc = {
        "schema_version": RECORD_VERSION,
        "kind": RECORD_KIND,
        "folder": str(folder.resolve()),
        "depends": depends(folder),
        "extra": _stamp(extra) if extra is not None else None,
        "eos_token_ids": eos,
        "clean_up_tokenization_spaces": clean,
        "checked": checked,
        "layout": layout,
        "tokenizer": tokenizer,
    }
    return atomic_write(record_path(folder), json.dumps(doc))


# ---------------------------------------------------------------------------- the run


@dataclass
class DirectRun:
    """A run the direct path answered: the same document and timing line as a regular one
    (run.execute.RunResult), engine "direct"."""

    ref: ModelRef
    request: GenerationRequest
    generation: GenerationResult
    load_s: float
    dtype: str  # as the regular run that checked the record reported it ("int4+float32")
    layers: int
    wall: dict[str, float] = field(default_factory=dict)

    @property
    def build_label(self) -> str:
        return f"direct on cpu, {self.dtype}"

    predicted_decode_tokens_per_s = None  # no plan
    direct_note = None  # a regular run's note about the record: none here

    def wall_split(self) -> dict[str, float]:
        """As run.document.wall_split (import here: Python, the CLI, numpy)."""
        return wall_split(self.wall, self.generation.timings)

    def to_document(self) -> dict[str, Any]:
        n = self.layers
        fused = {"mlps": n, "norms": 2 * n + 1, "attentions": n, "layers": n, "model": 1, "experts": 0}
        return run_document(
            self.ref, self.request, self.generation, self.load_s, self.wall_split(),
            engine="direct", device="cpu", dtype=self.dtype, fused={**fused, "rejected": 0},
            quant=self.ref.spec.quant or "none", plan=None, engine_stats=None,
            prediction={"reason": "direct runs are not predicted (the prompt goes through decode steps)"},
        )  # fmt: skip


def refusal(setup: ModelSetup, request: GenerationRequest) -> str | None:
    """Why the direct path does not take this run (before any file is read), or None."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "off"):
        raise InputError(f"{ENV}={choice!r} is not one of auto, off", f"unset {ENV}, or set it to off")
    if choice == "off":
        return f"{ENV}=off"
    if setup.plan_path is not None or setup.gpu_budget_bytes is not None or setup.device == "cuda":
        return "a plan or a GPU was asked for"
    if setup.cpu_moe or setup.n_cpu_moe or setup.expert_use_path is not None or setup.dtype != "auto":
        return "expert placement or a --dtype was asked for"
    if setup.device == "auto" and gpu_present():
        return "this machine has an NVIDIA GPU (pass --device cpu to run on the CPU)"
    if request.chat or not request.sampling.greedy:
        return "--chat and sampling run the regular path"
    return None


def gpu_present() -> bool:
    """Whether an NVIDIA GPU may be usable here, without importing torch (its device nodes)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").exists()


def try_direct(
    setup: ModelSetup, request: GenerationRequest, on_text: TextCallback | None = None
) -> DirectRun | None:
    """The run through the direct path, or None when it does not take it (module docstring;
    with HETEGEN_DEBUG set, a note says why). Errors in the request or the model's files are
    raised as the regular path would raise them."""
    startup = process_age_s()
    start = time.perf_counter()
    request.validate()
    why = refusal(setup, request)
    if why is not None:
        return _not_taken(why)
    ref = resolve_model(
        setup.model, need_weights=True, quant=setup.quant, allow_float_copy=setup.allow_float_copy
    )
    if ref.path is None or ref.spec.quant is None or ref.warnings:
        return _not_taken("not a quantized model folder without warnings")
    record = current_record(ref.path)
    if record is None or record.get("layout") is None:
        why = "no record yet, or files changed since" if record is None else record["checked"]["refused"]
        return _not_taken(why)
    words = Words(record["tokenizer"], bool(record["clean_up_tokenization_spaces"]))
    prompt_ids = prepare_prompt(words, request.prompt)
    if len(prompt_ids) > MAX_PROMPT_TOKENS:
        return _not_taken(f"the prompt has {len(prompt_ids)} tokens, over {MAX_PROMPT_TOKENS}")
    ref.spec.check_context(len(prompt_ids), request.max_new_tokens)
    resolved = time.perf_counter()
    try:
        with activity("loading"):
            model = direct.DirectModel(ref.path, record["layout"], extra=extra_files(ref.path, record))
    except (kernel_lib.Unavailable, direct.LayoutError) as exc:
        return _not_taken(str(exc))
    loaded = time.perf_counter()
    generation = generate_direct(
        model, words, prompt_ids, request.max_new_tokens, set(record["eos_token_ids"]), on_text
    )
    wall = {"import_s": startup, "resolve_s": resolved - start, "load_s": loaded - resolved,
            "generate_s": time.perf_counter() - loaded}  # fmt: skip
    dtype = str(record["checked"]["dtype"])
    return DirectRun(ref, request, generation, loaded - resolved, dtype, len(model.layers), wall)


def _not_taken(why: str) -> None:
    if os.environ.get("HETEGEN_DEBUG"):
        note(f"direct start not taken: {why}")


def generate_direct(
    model: direct.DirectModel,
    words: Words,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos: set[int],
    on_text: TextCallback | None = None,
) -> GenerationResult:
    """Greedy generation as run.generate.generate does it (the same stops, timings and
    streamed pieces), the prompt fed one token at a time."""
    decoder = IncrementalDecoder(words)
    model.start(len(prompt_ids) + max_new_tokens)
    tokens: list[int] = []
    decode_s = 0.0

    def pick(logits: Any) -> int:
        token = int(logits.argmax())
        if not logits[token] == logits[token] or abs(float(logits[token])) == float("inf"):
            raise ModelError(
                "the model produced logits that are NaN or infinite",
                "the weights may be damaged; run with HETEGEN_DIRECT=off to compare with the regular path",
            )
        return token

    def emit(token: int) -> None:
        piece = decoder.push(token) if token not in eos else ""
        if piece and on_text is not None:
            on_text(piece)

    with activity("generating"):
        start = time.perf_counter()
        for t in prompt_ids:
            logits = model.step(t)
        prefill_end = time.perf_counter()
        token = pick(logits)
        first = time.perf_counter()
        tokens.append(token)
        emit(token)
        while token not in eos and len(tokens) < max_new_tokens:
            step_start = time.perf_counter()
            token = pick(model.step(token))
            decode_s += time.perf_counter() - step_start
            tokens.append(token)
            emit(token)
        total_s = time.perf_counter() - start
    tail = decoder.flush()
    if tail and on_text is not None:
        on_text(tail)
    timings = GenerationTimings(
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(tokens),
        prefill_s=prefill_end - start,
        time_to_first_token_s=first - start,
        decode_s=decode_s,
        decode_steps=len(tokens) - 1,
        total_s=total_s,
    )
    return GenerationResult(
        prompt_token_ids=list(prompt_ids),
        token_ids=tokens,
        text=words.decode(tokens, skip_special_tokens=True),
        stop_reason="eos" if tokens[-1] in eos else "length",
        timings=timings,
    )
