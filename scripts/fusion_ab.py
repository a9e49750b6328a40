"""The plain quantized model with its decode fusions against without, interleaved in one process
(docs/quant.md, "One call per attention, MLP, MoE layer and norm").

Usage: python scripts/fusion_ab.py [--model FILE.gguf] [--prompt-len 128] [--new-tokens 32]
       [--repeat 3] [--warmup 1] [--threads N] [--output FILE.json]

Loads the model twice (`load_quantized`, then again inside `fused.unfused()`), generates from
the same random prompt (seed 0), greedy, without stopping at EOS, `warmup` untimed rounds then
`repeat` timed ones, the two sides taking turns within each round. Prints one JSON document:
the machine and its load, what was fused, each side's decode ms per token (every run, median,
min, max), their ratio and whether the greedy tokens are equal.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from cold_start import load, machine  # scripts/ is sys.path[0]
from compare_decode import _Silent, spread

from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import fused
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.run.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: hetegen's default model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--output", default=None, help="also write the document here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = machine()
    ref = resolve_model(args.model, need_weights=True, quant="auto")
    sides = {"fused": load_quantized(ref)}
    with fused.unfused():
        sides["unfused"] = load_quantized(ref)
    prompt = [random.Random(0).randrange(10, ref.spec.vocab_size) for _ in range(args.prompt_len)]
    ms: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.warmup + args.repeat):
        for name, loaded in sides.items():
            out = generate(
                loaded.model, _Silent(), prompt, max_new_tokens=args.new_tokens, eos_ids=set(), device="cpu"
            )
            tokens[name] = out.token_ids
            if round_ >= args.warmup:
                ms[name].append(1000.0 / out.timings.decode_tokens_per_s)
    doc = {
        "kind": "hetegen.fusion_ab",
        "machine": before,
        "load_after": load(),
        "model": ref.name,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "fused": sides["fused"].fused,
        "decode_ms_per_token": {name: spread(values) for name, values in ms.items()},
        "speedup": statistics.median(ms["unfused"]) / statistics.median(ms["fused"]),
        "tokens_equal": tokens["fused"] == tokens["unfused"],
    }
    for loaded in sides.values():
        loaded.close()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")


if __name__ == "__main__":
    main()
