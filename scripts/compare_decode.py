"""hetegen plain against the engine's all-CPU plan against llama.cpp, on one GGUF (issue 22).

Usage: python scripts/compare_decode.py [--model FILE.gguf] [--prompt-len 128]
       [--new-tokens 64] [--repeat 3] [--warmup 1] [--threads N]
       [--arms plain,plain-torch,engine,direct,llama.cpp] [--cold-start] [--output FILE.json]

Loads each arm once in this process: `plain` is the model as `hetegen run` runs it on a
machine without a GPU (the GGUF's quantized linears on hetegen's CPU kernels where
available, models.formats.cpu_kernels; --quant auto); `plain-torch` is the same on torch's
packed kernels (skipped for a float model); `engine` is the same folder through the engine
with every linear whole on the CPU (an all-CPU plan in the plain model's activation dtype,
the CPU backend); `direct` is the direct start's model (models.formats.direct: the plain
model's fused decode steps run from the files with numpy, docs/run.md "Direct start"; needs
`plain`; its prompt goes through decode steps, so compare its decode, not its prefill);
`llama.cpp` is llama-cpp-python on the GGUF file itself (skipped, with the
reason, when `llama_cpp` cannot be imported or the model is not a GGUF), driven by the same
generation loop (hetegen_cli.bench.llama_cpp). Each arm generates from the same
random prompt (seed 0), greedy, without stopping at EOS: `warmup` untimed runs, then
`repeat` timed rounds, the arms taking turns within each round so that a change in the
machine's load hits them alike. Prints one JSON document: the machine and its load before
and after, each arm's prefill seconds and decode tok/s (every run, median, min, max), the
ratios of the medians (plain / llama.cpp, plain / plain-torch, engine / plain, engine /
llama.cpp), whether each
arm's greedy tokens equal plain's, and with --cold-start the document of
scripts/cold_start.py (whole `hetegen run` processes). Quote numbers from an idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from cold_start import cold_start_document, load, machine  # scripts/ is sys.path[0]

from hetegen_cli.core.devices import CpuBackend, dtype_name
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.gguf import default_gguf_path
from hetegen_cli.models.loading.loader import load_model
from hetegen_cli.models.loading.quantized_loader import activation_dtype, load_quantized
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import RuntimeSettings
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.run.generate import generate

ARMS = ("plain", "plain-torch", "engine", "direct", "llama.cpp")


class _Direct:
    """The direct start's model built from the plain arm's layout (its extra tensors in a
    temporary file), answering what this script asks of an arm."""

    def __init__(self, plain, folder: Path, tmp: Path) -> None:
        from safetensors.torch import save_file

        from hetegen_cli.models.formats import direct
        from hetegen_cli.run.direct_check import _made_at_load, layout_of

        layout = layout_of(plain.model)
        if layout is None:
            raise ValueError("the plain model's decode step is not fused whole")
        extra = _made_at_load(plain.model, layout, folder)
        files = ()
        if extra:
            save_file(extra, str(tmp / "extra.safetensors"))
            files = (tmp / "extra.safetensors",)
        self.model = direct.DirectModel(folder, layout, torch.get_num_threads(), files)
        self.dtype = plain.dtype

    def generate(self, prompt: list[int], new_tokens: int):
        from hetegen_cli.run.direct import generate_direct

        return generate_direct(self.model, _Silent(), prompt, new_tokens, set())

    def close(self) -> None:
        pass


class _Silent:
    """A tokenizer stand-in: generate only needs decode() for streaming text."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def spread(values: list[float]) -> dict:
    return {"runs": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def load_arms(args, ref) -> tuple[dict, dict]:
    """(arm -> LoadedModel, arm -> why it was skipped)."""
    loaded, skipped = {}, {}
    if "plain" in args.arms:
        loaded["plain"] = load_quantized(ref) if ref.spec.quant else load_model(ref, "float32")
    if "plain-torch" in args.arms and ref.spec.quant:
        with cpu_kernels.torch_kernels():
            loaded["plain-torch"] = load_quantized(ref)
    if "engine" in args.arms:
        dtype = dtype_name(activation_dtype()) if ref.spec.quant else "float32"
        runtime = RuntimeSettings(
            weights_dtype=dtype,
            cpu_dtype_prefill=dtype,
            cpu_dtype_decode=dtype,
            cpu_threads=args.threads,
            staging_buffers=0,
            prefetch_depth=0,
            pin_weights=False,
            requires_gpu=False,
        )
        plan = manual_plan(ref.spec, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0, runtime=runtime)
        loaded["engine"] = load_hetero_model(
            ref, plan.placements, runtime, CpuBackend(), progress=False, experts=plan.experts
        )
    if "direct" in args.arms:
        if "plain" not in loaded:
            skipped["direct"] = "the direct arm is built from the plain arm: add plain to --arms"
        else:
            try:
                loaded["direct"] = _Direct(loaded["plain"], ref.path, Path(tempfile.mkdtemp()))
            except Exception as exc:  # a model the direct path does not take
                skipped["direct"] = f"no direct start for this model: {exc}"
    if "llama.cpp" in args.arms:
        gguf = Path(args.model) if args.model else default_gguf_path()
        try:
            from hetegen_cli.bench.llama_cpp import llama_cpp_available, load_llama_cpp

            if gguf.suffix.lower() != ".gguf":
                skipped["llama.cpp"] = f"{gguf} is not a GGUF file"
            elif not llama_cpp_available():
                skipped["llama.cpp"] = "llama_cpp cannot be imported (pip install 'hetegen[llama]')"
            else:
                config = next(iter(loaded.values())).model.config if loaded else None
                n_ctx = args.prompt_len + args.new_tokens + 8
                loaded["llama.cpp"] = load_llama_cpp(gguf, config, args.threads, n_ctx)
        except ImportError as exc:
            skipped["llama.cpp"] = f"cannot load llama.cpp: {exc}"
    return loaded, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: hetegen's default model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--cold-start", action="store_true", help="also time fresh `hetegen run` processes")
    ap.add_argument("--output", type=Path, default=None, help="also write the document here")
    args = ap.parse_args()
    args.arms = tuple(a for a in args.arms.split(",") if a)
    if unknown := set(args.arms) - set(ARMS):
        sys.exit(f"unknown arms {sorted(unknown)}; choose among {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    before = machine()
    ref = resolve_model(args.model, need_weights=True, quant="auto")
    prompt = [random.Random(0).randrange(10, ref.spec.vocab_size) for _ in range(args.prompt_len)]
    loaded, skipped = load_arms(args, ref)

    def one(name: str):
        arm = loaded[name]  # the llama.cpp adapter has no parameters to take a device from
        if name == "direct":
            return arm.generate(prompt, args.new_tokens)
        return generate(
            arm.model, _Silent(), prompt, max_new_tokens=args.new_tokens, eos_ids=set(), device=arm.device
        )

    for _ in range(args.warmup):
        for name in loaded:
            one(name)
    prefill: dict[str, list[float]] = {name: [] for name in loaded}
    decode: dict[str, list[float]] = {name: [] for name in loaded}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeat):
        for name in loaded:
            result = one(name)
            prefill[name].append(result.timings.prefill_s)
            decode[name].append(result.timings.decode_tokens_per_s)
            tokens[name] = result.token_ids
    after = load()
    for model in loaded.values():
        model.close()
    arms = {
        name: {
            "prefill_s": spread(prefill[name]),
            "decode_tokens_per_s": spread(decode[name]),
            "tokens_equal_plain": tokens[name] == tokens["plain"] if "plain" in tokens else None,
            "dtype": loaded[name].dtype,
        }
        for name in loaded
    }

    def ratio(a: str, b: str, what: str) -> float | None:
        if a not in arms or b not in arms:
            return None
        return arms[a][what]["median"] / arms[b][what]["median"]

    doc = {
        "kind": "hetegen.compare_decode",
        "machine": before,
        "load_after": after,
        "model": ref.name,
        "quant": ref.spec.quant_label if ref.spec.quant else "none",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "cpu_kernels": cpu_kernels.label(),
        "arms": arms,
        "skipped": skipped,
        "decode_ratio": {
            "plain/llama.cpp": ratio("plain", "llama.cpp", "decode_tokens_per_s"),
            "plain/plain-torch": ratio("plain", "plain-torch", "decode_tokens_per_s"),
            "engine/plain": ratio("engine", "plain", "decode_tokens_per_s"),
            "engine/llama.cpp": ratio("engine", "llama.cpp", "decode_tokens_per_s"),
            "direct/plain": ratio("direct", "plain", "decode_tokens_per_s"),
            "direct/llama.cpp": ratio("direct", "llama.cpp", "decode_tokens_per_s"),
        },
        "prefill_speed_ratio": {  # > 1: faster than the other
            "plain/llama.cpp": ratio("llama.cpp", "plain", "prefill_s"),
            "plain/plain-torch": ratio("plain-torch", "plain", "prefill_s"),
            "engine/plain": ratio("plain", "engine", "prefill_s"),
        },
    }
    if args.cold_start:
        doc["cold_start"] = cold_start_document(args.model, "The capital of France is", 30, args.repeat, 1)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output is not None:
        atomic_write(args.output, text + "\n")  # never a half-written file


if __name__ == "__main__":
    main()
