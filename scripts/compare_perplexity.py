"""Perplexity of one GGUF file through hetegen and through llama.cpp, on the same token ids and
the same windows (hetegen eval's: `--context C --stride C`, non-overlapping but for one token).

Usage: python scripts/compare_perplexity.py --model FILE.gguf [--context 512] [--text FILE]
           [--llama-python PYTHON] [--threads 2] [--out result.json]

hetegen's side is `hetegen eval`'s own code (run.evaluate: the model as `run` builds it, its
tokenizer). llama.cpp's side runs in `--llama-python` (a Python with llama-cpp-python; default:
this one): the same ids, window by window, every position's logits (logits_all), log-softmax in
float64. The ratio is llama.cpp's perplexity over hetegen's.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hetegen_cli.run.evaluate import evaluate, read_text, windows
from hetegen_cli.run.setup import ModelSetup

LLAMA_SIDE = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama
args = json.load(open(sys.argv[1]))
llm = Llama(model_path=args["model"], n_ctx=args["context"], logits_all=True,
            n_threads=args["threads"], n_batch=args["context"], verbose=False)
ids, nll, count = args["ids"], 0.0, 0
for start, end, scored in args["windows"]:
    llm.reset()
    llm.eval(ids[start:end])
    logits = np.asarray(llm.scores[: end - start], dtype=np.float64)  # [T, V]
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    for pos in range(scored, end):  # log p(ids[pos] | ids[start:pos])
        nll -= logp[pos - start - 1, ids[pos]]
        count += 1
print(json.dumps({"nll": nll, "count": count, "llama_cpp_version": __import__("llama_cpp").__version__}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--text", type=Path, default=None, help="default: hetegen eval's built-in text")
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    start = time.perf_counter()
    result, built = evaluate(ModelSetup(model=a.model), a.text, a.context, a.context)
    hetegen_s = time.perf_counter() - start
    built.close()
    from hetegen_cli.models.loading.loader import load_tokenizer
    from hetegen_cli.models.loading.source import resolve_model

    ref = resolve_model(a.model, need_weights=True, quant="auto")
    ids = [int(i) for i in load_tokenizer(ref.path)(read_text(a.text)[0])["input_ids"]]
    spans = windows(len(ids), a.context, a.context)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(
            {"model": a.model, "context": a.context, "threads": a.threads, "ids": ids, "windows": spans}, f
        )
    start = time.perf_counter()
    out = subprocess.run(
        [a.llama_python, "-c", LLAMA_SIDE, f.name], check=True, capture_output=True, text=True
    )
    llama_s = time.perf_counter() - start
    llama = json.loads(out.stdout.strip().splitlines()[-1])
    llama_ppl = math.exp(llama["nll"] / llama["count"])
    doc = {
        "model": a.model,
        "context": a.context,
        "tokens": len(ids),
        "windows": len(spans),
        "hetegen": {**result.as_dict(), "seconds": hetegen_s},
        "llama_cpp": {
            "perplexity": llama_ppl,
            "tokens_scored": llama["count"],
            "version": llama["llama_cpp_version"],
            "seconds": llama_s,
        },
        "ratio_llama_cpp_over_hetegen": llama_ppl / result.perplexity,
    }
    print(json.dumps(doc, indent=2))
    if a.out is not None:
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
