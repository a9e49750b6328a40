"""The plain quantized model's prefill through torch's GEMM against oneDNN's, interleaved in one
process (docs/quant.md, "Prompt products"; models.formats.cpu_gemm).

Usage: python scripts/prompt_gemm_ab.py [--model FILE.gguf] [--prompt-len 128] [--repeat 5]
       [--warmup 1] [--threads N] [--output FILE.json]

Loads the model once (`load_quantized`), then runs the same random prompt (seed 0) through one
forward (the logits of its last position), `warmup` untimed rounds then `repeat` timed ones, the
two GEMMs taking turns within each round. Prints one JSON document: the machine and its load,
what `cpu_gemm` would choose by itself for each class of product (and what it
measured), each GEMM's prefill seconds (every
run, median, min, max), their ratio, and the largest difference of the last logits between them
relative to the largest logit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import torch
from cold_start import load, machine  # scripts/ is sys.path[0]
from compare_decode import spread

from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import cpu_gemm
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: hetegen's default model)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--output", default=None, help="also write the document here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = machine()
    own = {cls: dataclasses.asdict(cpu_gemm.choice(cls)) for cls in cpu_gemm.CLASSES}
    ref = resolve_model(args.model, need_weights=True, quant="auto")
    loaded = load_quantized(ref)
    prompt = [random.Random(0).randrange(10, ref.spec.vocab_size) for _ in range(args.prompt_len)]
    ids = torch.tensor([prompt])
    seconds: dict[str, list[float]] = {name: [] for name in cpu_gemm.BACKENDS}
    logits: dict[str, torch.Tensor] = {}
    for round_ in range(args.warmup + args.repeat):
        for name in cpu_gemm.BACKENDS:
            cpu_gemm.force(name)
            start = time.perf_counter()
            with torch.inference_mode():
                out = loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            spent = time.perf_counter() - start
            logits[name] = out.logits[0, -1].float()
            if round_ >= args.warmup:
                seconds[name].append(spent)
    diff = (logits["onednn"] - logits["torch"]).abs().max() / logits["torch"].abs().max()
    doc = {
        "kind": "hetegen.prompt_gemm_ab",
        "machine": before,
        "load_after": load(),
        "model": ref.name,
        "prompt_len": args.prompt_len,
        "threads": args.threads,
        "own_choice": own,
        "prefill_s": {name: spread(values) for name, values in seconds.items()},
        "onednn_speedup": statistics.median(seconds["torch"]) / statistics.median(seconds["onednn"]),
        "logits_rel_diff": float(diff),
        "same_argmax": int(logits["onednn"].argmax()) == int(logits["torch"].argmax()),
    }
    loaded.close()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        atomic_write(args.output, text + "\n")


if __name__ == "__main__":
    main()
