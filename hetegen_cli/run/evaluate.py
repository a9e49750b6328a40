"""Perplexity of a model on a text: the quality check of quantized (or any) execution.

The text is tokenized once and scored in windows of `context` tokens that start every
`stride` tokens; each token after the first is scored once, by the first window in which it
has at least max(1, `context - stride`) tokens before it (all tokens of the first window are
scored). With `stride == context` the windows overlap by one token, so that the first token of
each window has one before it. perplexity =
exp(mean negative log-likelihood), from float32 log-softmax of the model's logits.
The model is built exactly as `hetegen run` builds it (run.builders), so a perplexity
describes what `run` would generate with.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hetegen_cli.core.errors import InputError, UsageError
from hetegen_cli.measure.expert_use import ExpertCounter
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.profile.expert_use import ExpertUse, LayerUse, save_expert_use
from hetegen_cli.run.builders import decide_build, load_build, resolve_setup
from hetegen_cli.run.setup import ModelSetup, Workload

#: the text shipped with hetegen: 1,277 words of plain English prose (written for hetegen)
DEFAULT_TEXT = "eval.txt"


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll_per_token: float
    tokens_scored: int
    text_tokens: int
    windows: int
    context: int
    stride: int
    seconds: float
    text: str  # where the text came from
    text_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: Path | None) -> tuple[str, str]:
    """(text, where it came from): the file at `path`, or hetegen's own text."""
    if path is None:
        return resources.files("hetegen_cli.data").joinpath(DEFAULT_TEXT).read_text(
            encoding="utf-8"
        ), DEFAULT_TEXT
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--text {path} is not UTF-8 text", "pass a plain UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"cannot read --text {path}: {exc.strerror or exc}", "check the path") from None
    return text, str(path)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens (see the module)."""
    out, start, scored = [], 0, 1
    while True:
        end = min(start + context, n)
        out.append((start, end, scored))
        if end >= n:
            return out
        start = min(start + stride, end - 1)  # token `end` needs one before it in its window
        scored = end


def perplexity(
    built: LoadedModel,
    ids: list[int],
    context: int,
    stride: int,
    on_window: Callable[[], None] | None = None,
    experts: ExpertCounter | None = None,
) -> tuple[float, int, int]:
    """(summed negative log-likelihood, tokens scored, windows) of `ids` under `built`;
    `experts` counts the routers' choices of each token once (measure.expert_use)."""
    import torch

    nll, count, spans = 0.0, 0, windows(len(ids), context, stride)
    with torch.inference_mode():
        for start, end, scored in spans:
            if experts is not None:  # tokens before `scored` were counted by the window before
                experts.skip = 0 if start == 0 else scored - start
                experts.counted(end - start - experts.skip)
            chunk = torch.tensor([ids[start:end]], dtype=torch.long, device=built.device)  # [1, T]
            logits = built.model(input_ids=chunk, use_cache=False).logits[0].float()  # [T, V]
            logp = torch.log_softmax(logits[:-1], dim=-1)
            targets = chunk[0, 1:]
            picked = logp.gather(1, targets[:, None])[:, 0]  # log p(token t | tokens < t)
            keep = picked[scored - start - 1 :]  # windows() keeps scored > start
            nll -= float(keep.sum())
            count += keep.numel()
            if on_window is not None:
                on_window()
    return nll, count, len(spans)


def evaluate(
    setup: ModelSetup,
    text_path: Path | None = None,
    context: int = 512,
    stride: int | None = None,
    progress: Any = None,
    expert_use: Path | None = None,
) -> tuple[EvalResult, LoadedModel]:
    """Build the model as `run` would and measure its perplexity on the text; with
    `expert_use`, also count a MoE model's routing choices into that file (profile.expert_use)."""
    if not 2 <= context <= 2**20:
        raise UsageError(f"--context {context} is outside [2, 2^20]", "use e.g. --context 512")
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context:
        raise UsageError(
            f"--stride {stride} must be in [1, --context]",
            "use e.g. --stride 256 with --context 512, or leave it out",
        )
    text, source = read_text(text_path)
    resolved = resolve_setup(setup)
    ids = [int(i) for i in resolved.tokenizer(text)["input_ids"]]
    if len(ids) < 2:
        raise InputError(f"the text ({source}) has fewer than 2 tokens", "pass a longer text")
    context = min(context, resolved.ref.spec.max_positions)
    stride = min(stride, context)
    # a plan made here is made for one window scored at once: its tokens, nothing generated
    built = load_build(decide_build(resolved, Workload(min(context, len(ids)), 1)))
    try:
        task = (
            progress.add_task("perplexity", total=len(windows(len(ids), context, stride)))
            if progress
            else None
        )
        counter = _expert_counter(built) if expert_use is not None else None
        start = time.perf_counter()
        with counter or contextlib.nullcontext():
            nll, count, n_windows = perplexity(
                built, ids, context, stride, (lambda: progress.advance(task)) if progress else None, counter
            )
        seconds = time.perf_counter() - start
    except BaseException:
        built.close()
        raise
    mean = nll / count
    result = EvalResult(
        perplexity=math.exp(mean),
        nll_per_token=mean,
        tokens_scored=count,
        text_tokens=len(ids),
        windows=n_windows,
        context=context,
        stride=stride,
        seconds=seconds,
        text=source,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
    if counter is not None:
        _save_expert_use(counter, resolved.ref.spec, result, expert_use)
    return result, built


def _expert_counter(built: LoadedModel) -> ExpertCounter:
    try:
        return ExpertCounter(built.model)
    except ValueError:
        raise UsageError(
            f"{built.folder} is a dense model: it has no experts to count",
            "drop --expert-use, or give a mixture-of-experts model (docs/models.md)",
        ) from None


def _save_expert_use(counter: ExpertCounter, spec: Any, result: EvalResult, path: Path) -> None:
    """The counts as a profile.expert_use document, written atomically to `path`."""
    use = ExpertUse(
        model=spec.name,
        architecture=spec.architecture,
        config_hash=spec.config_hash,
        num_experts=counter.num_experts,
        top_k=counter.top_k,
        tokens=counter.tokens,
        text=result.text,
        text_sha256=result.text_sha256,
        layers=[LayerUse(**layer) for layer in counter.layers()],
    )
    save_expert_use(use, path)
