"""The engine's own cost on the CPU: plain transformers against all-CPU plans through the engine.

Usage: python scripts/engine_overhead.py [--model smollm2-135m] [--prompt-len 512]
       [--new-tokens 32] [--repeat 5] [--rounds 2] [--formats float32/float32,bfloat16/float32]

Loads the model once plainly (float32) and once through the engine per prefill/decode CPU
format pair (every linear whole on the CPU, CpuBackend), then times `run.generate` on a fixed
random prompt: one warm-up, then `repeat` runs per model, the models interleaved over `rounds`
rounds (the machine is shared: compare within a round). Prints the median and sd of prefill
seconds and decode tok/s per model and round.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loading.loader import load_model
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import RuntimeSettings
from hetegen_cli.plan.manual import manual_plan
from hetegen_cli.run.generate import generate


class _Silent:
    """A tokenizer stand-in: generate only needs decode() for streaming text."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def _time(model, prompt: list[int], new_tokens: int, repeat: int) -> tuple[list[float], list[float]]:
    generate(model, _Silent(), prompt[:16], max_new_tokens=2, eos_ids=set())  # warm-up
    prefill, decode = [], []
    for _ in range(repeat):
        r = generate(model, _Silent(), prompt, max_new_tokens=new_tokens, eos_ids=set())
        prefill.append(r.timings.prefill_s)
        decode.append(r.timings.decode_tokens_per_s)
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: hetegen's default model")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--formats", default="float32/float32,bfloat16/float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = resolve_model(args.model, need_weights=True, dtype="float32")
    prompt = [random.Random(0).randrange(10, ref.spec.vocab_size) for _ in range(args.prompt_len)]
    models = {"plain float32": load_model(ref, "float32")}
    for pair in args.formats.split(","):
        prefill, decode = pair.split("/")
        runtime = RuntimeSettings(
            weights_dtype="float32",
            cpu_dtype_prefill=prefill,
            cpu_dtype_decode=decode,
            cpu_threads=args.threads,
            staging_buffers=0,
            prefetch_depth=0,
            pin_weights=False,
            requires_gpu=False,
        )
        plan = manual_plan(ref.spec, cpu_fraction_prefill=1.0, cpu_fraction_decode=1.0, runtime=runtime)
        models[f"engine {pair}"] = load_hetero_model(
            ref, plan.placements, runtime, CpuBackend(), progress=False
        )
    print(
        f"{ref.name}: prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, "
        f"{args.repeat} runs per model per round (median ± sd)"
    )
    for rnd in range(args.rounds):
        for name, loaded in models.items():
            prefill, decode = _time(loaded.model, prompt, args.new_tokens, args.repeat)
            sd = statistics.stdev if args.repeat > 1 else (lambda _: 0.0)
            print(
                f"round {rnd}  {name:28s} prefill {statistics.median(prefill):.3f} ± {sd(prefill):.3f} s"
                f"   decode {statistics.median(decode):.1f} ± {sd(decode):.1f} tok/s",
                flush=True,
            )
    for loaded in models.values():
        loaded.close()


if __name__ == "__main__":
    main()
