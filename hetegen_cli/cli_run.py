"""`hetegen run`: generate text from a prompt, streaming tokens to stdout, timings to stderr.

`execute_run(options)` is the library entry point: validate -> resolve the model -> tokenize
-> check the context -> pick device and dtype -> build the model -> generate. The "build" step
is a replaceable function (`ModelBuilder`), so the heterogeneous engine slots in behind the
same command: run_engine.choose_builder picks the heterogeneous engine when a plan is given or
the model does not fit the GPU (see run_engine.py), else the stock model runs plainly.
torch is imported inside functions only, so `hetegen --help` stays fast.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from hetegen_cli.cli_common import MODEL_HELP, guarded
from hetegen_cli.errors import DeviceError, InputError
from hetegen_cli.generate import SamplingOptions

#: Extra GPU memory kept free beyond weights and KV cache when choosing --device auto (bytes).
GPU_HEADROOM_BYTES = 512 * 1024**2


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass(frozen=True)
class RunOptions:
    prompt: str
    model: str | None = None          # --model as typed; None = the default model
    chat: bool = False
    max_new_tokens: int = 64
    sampling: SamplingOptions = SamplingOptions()
    dtype: str = "auto"               # auto | float32 | bfloat16 | float16
    device: str = "auto"              # auto | cpu | cuda


@dataclass
class BuiltModel:
    """What a ModelBuilder returns: a model that `generate` can drive."""

    model: Any
    engine: str                       # "plain" here; the heterogeneous engine uses its own name
    device: str                       # where inputs go, e.g. "cpu" or "cuda:0"
    dtype: str
    load_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything known before weights are loaded (input to a ModelBuilder)."""

    options: RunOptions
    ref: Any                          # model_source.ModelRef
    tokenizer: Any
    prompt_ids: list[int]
    backend: Any                      # devices.Backend
    dtype: str                        # resolved, never "auto"
    fits_on_gpu: bool = False         # the whole model fits in free GPU memory


ModelBuilder = Callable[[RunContext], BuiltModel]


@dataclass
class RunResult:
    context: RunContext
    built: BuiltModel
    generation: Any                   # generate.GenerationResult

    def to_document(self) -> dict[str, Any]:
        ref, gen = self.context.ref, self.generation
        return {
            "schema_version": 1, "kind": "hetegen.run",
            "model": {"name": ref.name, "source": ref.kind, "arg": ref.arg,
                      "path": str(ref.path) if ref.path else None, "hub_id": ref.hub_id,
                      "architecture": ref.spec.architecture, "layers": ref.spec.num_layers,
                      "parameters": ref.spec.parameter_count,
                      "max_positions": ref.spec.max_positions},
            "prompt": self.context.options.prompt, "chat": self.context.options.chat,
            "prompt_token_ids": gen.prompt_token_ids, "text": gen.text,
            "token_ids": gen.token_ids, "stop_reason": gen.stop_reason,
            "sampling": _sampling_doc(self.context.options.sampling),
            "timings": {"load_s": self.built.load_s, **gen.timings.as_dict()},
            "engine": self.built.engine, "device": self.built.device, "dtype": self.built.dtype,
            "plan": self.built.extra.get("plan"), "engine_stats": self.built.extra.get("engine_stats"),
        }


def _sampling_doc(s: SamplingOptions) -> dict[str, Any]:
    return {"mode": "greedy" if s.greedy else "sample", "temperature": s.temperature,
            "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed}


def pick_device(options: RunOptions, ref: Any, prompt_tokens: int) -> tuple[Any, str, bool]:
    """(backend, dtype, fits): --device auto uses the GPU plainly only when the whole model fits
    in free memory; otherwise the heterogeneous engine runs it (run_engine.choose_builder)."""
    from hetegen_cli.devices import CpuBackend, cuda_available, get_backend
    from hetegen_cli.loader import resolve_dtype
    from hetegen_cli.model_spec import DTYPE_BYTES

    kind = options.device
    if kind == "auto" and not cuda_available():
        kind = "cpu"
    try:
        backend = get_backend("cuda" if kind in ("auto", "cuda") else "cpu")
    except DeviceError as exc:
        raise DeviceError(exc.message, "run without --device cuda (or with --device cpu)") from exc
    dtype = resolve_dtype(options.dtype, ref.spec.dtype, "cuda" if backend.is_cuda else "cpu")
    if not backend.is_cuda:
        return backend, dtype, False
    scale = DTYPE_BYTES[dtype] / ref.spec.dtype_bytes
    need = int(ref.spec.total_weight_bytes * scale
               + ref.spec.kv_cache_bytes(prompt_tokens + options.max_new_tokens) * scale
               + GPU_HEADROOM_BYTES)
    free, _ = backend.memory_info()
    if need <= free:
        return backend, dtype, True
    if kind == "cuda":
        return backend, dtype, False
    return CpuBackend(), resolve_dtype(options.dtype, ref.spec.dtype, "cpu"), False


def build_plain_model(ctx: RunContext) -> BuiltModel:
    """The stock transformers model, whole, on the chosen device."""
    from hetegen_cli.loader import load_model

    loaded = load_model(ctx.ref, dtype=ctx.dtype, device=str(ctx.backend.device))
    return BuiltModel(loaded.model, "plain", loaded.device, loaded.dtype, loaded.load_s)


def prepare_run(options: RunOptions) -> RunContext:
    """Every check that needs no weights: options, model path/shapes, prompt tokens, context."""
    from hetegen_cli.generate import check_context, prepare_prompt
    from hetegen_cli.loader import load_tokenizer
    from hetegen_cli.model_source import resolve_model

    if not options.prompt or not options.prompt.strip():
        raise InputError("the prompt is empty", 'pass some text, e.g. --prompt "The capital of France is"')
    if options.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {options.max_new_tokens} is below 1", "ask for at least 1 token")
    options.sampling.validate()
    ref = resolve_model(options.model, need_weights=True)
    tokenizer = load_tokenizer(ref.path)
    prompt_ids = prepare_prompt(tokenizer, options.prompt, chat=options.chat)
    check_context(len(prompt_ids), options.max_new_tokens, ref.spec.max_positions)
    backend, dtype, fits = pick_device(options, ref, len(prompt_ids))
    return RunContext(options, ref, tokenizer, prompt_ids, backend, dtype, fits)


def execute_run(options: RunOptions, on_text: Callable[[str], None] | None = None,
                build: ModelBuilder | None = None, engine: Any = None) -> RunResult:
    """Validate, build the model, generate. `on_text` receives streamed pieces.

    `build` defaults to run_engine.choose_builder's choice for `engine` (EngineOptions):
    the heterogeneous engine when a plan applies, else the plain stock model.
    """
    from hetegen_cli.devices import out_of_memory_as_error
    from hetegen_cli.generate import generate
    from hetegen_cli.run_engine import EngineOptions, choose_builder

    ctx = prepare_run(options)
    if build is None:
        build = choose_builder(ctx, engine or EngineOptions()) or build_plain_model
    built = build(ctx)
    hetero = built.extra.pop("hetero", None)
    try:
        with out_of_memory_as_error("generating"):
            result = generate(built.model, ctx.tokenizer, ctx.prompt_ids,
                              max_new_tokens=options.max_new_tokens, sampling=options.sampling,
                              on_text=on_text, sync=ctx.backend.synchronize, device=built.device)
        if hetero is not None:
            built.extra["engine_stats"] = hetero.stats()
    finally:
        if hetero is not None:
            hetero.close()
    return RunResult(ctx, built, result)


def timing_line(result: RunResult) -> str:
    t = result.generation.timings
    return (f"load {result.built.load_s:.2f} s | prefill {t.prompt_tokens} tok in {t.prefill_s:.3f} s "
            f"| first token {t.time_to_first_token_s:.3f} s | decode {t.generated_tokens} tok, "
            f"{t.decode_tokens_per_s:.1f} tok/s | {result.built.engine} on {result.built.device}, "
            f"{result.built.dtype} | stop: {result.generation.stop_reason}"
            + _plan_comparison(result))


def _plan_comparison(result: RunResult) -> str:
    """' | plan predicted X tok/s (achieved Y% of it)' when the engine ran a plan."""
    plan = result.built.extra.get("plan") or {}
    predicted = plan.get("predicted_decode_tokens_per_s")
    achieved = result.generation.timings.decode_tokens_per_s
    if not predicted or not achieved:
        return ""
    return f" | plan predicted {predicted:.2f} tok/s (achieved {100 * achieved / predicted:.0f}%)"


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    @app.command("run")
    @guarded
    def run_command(
        prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (or the user message with --chat)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples."),
        top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off)."),
        top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k likeliest tokens (0 = off)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling (reproducible output)."),
        dtype: DtypeChoice = typer.Option(DtypeChoice.auto, "--dtype", help="Weight dtype; auto = float32 on CPU, float16/bfloat16 on GPU."),
        device: DeviceChoice = typer.Option(DeviceChoice.auto, "--device", help="auto = the GPU when the whole model fits in free GPU memory, else the CPU."),
        plan: Optional[Path] = typer.Option(None, "--plan", help="Execute this plan (from `hetegen plan --output`). Default: plan on the fly when the model does not fit the GPU."),
        gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU budget for planning on the fly, e.g. 6GiB (needs a CUDA GPU)."),
        profile: Optional[Path] = typer.Option(None, "--profile", help="Hardware profile for planning on the fly. Default: this machine's saved one."),
        json_: bool = typer.Option(False, "--json", help="Print one JSON document (no streamed text)."),
    ) -> None:
        """Generate text: tokens stream to stdout, a timing line goes to stderr."""
        from hetegen_cli.output import emit_json, note, warn

        sampling = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if sampling.greedy and (top_p != 1.0 or top_k != 0 or seed is not None):
            warn("--top-p, --top-k and --seed have no effect with --temperature 0 (greedy)")
        options = RunOptions(prompt=prompt, model=model, chat=chat, max_new_tokens=max_new_tokens,
                             sampling=sampling, dtype=dtype.value, device=device.value)
        from hetegen_cli.run_engine import EngineOptions

        if plan is not None and gpu_memory is not None:
            raise InputError("--plan and --gpu-memory cannot be combined",
                             "the plan already fixes the GPU budget; re-plan to change it")
        engine = EngineOptions(plan_path=plan, gpu_memory=gpu_memory, profile_path=profile)
        result = execute_run(options, on_text=None if json_ else _write, engine=engine)
        if json_:
            emit_json(result.to_document())
            return
        _write("\n")
        note(timing_line(result))
