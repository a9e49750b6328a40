"""Peak memory of converting a Q4_K_M GGUF into hetegen's layout (issue 20: at most 1.3x the
file). Usage:

    python scripts/gguf_peak_rss.py [--layers 24] [--workdir /tmp/hetegen-rss] [--json]

Writes a synthetic Q4_K_M GGUF (models.formats.gguf_write: random weights, SmolLM2's
tokenizer; hidden 1024, intermediate 4096, 16 heads / 4 KV heads, `--layers` layers: 24 give
~260 MB) once, in a child process, then converts it with --quant auto in a fresh child and reports that
process's peak resident set (`ru_maxrss`, which counts file pages mapped into the process,
shared libraries included), beside the peak of a child
that only imports what the conversion imports and reads the file's config and tokenizer (the
fixed part, whatever the file's size), and the file's size. Needs the default model's GGUF
(its tokenizer) and a few hundred MB of disk. Not a benchmark: one conversion, no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

#: the conversion, as `hetegen run --model FILE` does it (--quant auto)
CONVERT = """
import sys
from pathlib import Path
from hetegen_cli.models.formats.gguf import ensure_converted_gguf
print(ensure_converted_gguf(Path(sys.argv[1]), "auto"))
"""
#: the synthetic file, written by a child (this process stays small)
WRITE = """
import json, sys
from pathlib import Path
from hetegen_cli.models.formats.gguf_write import write_llama_gguf
write_llama_gguf(json.loads(sys.argv[1]), Path(sys.argv[2]), "Q4_K_M", seed=0, name="rss")
"""
#: the fixed part: the same imports, the file's config and tokenizer, nothing converted
FIXED = """
import sys, tempfile
from pathlib import Path
import torch, gguf, transformers
from hetegen_cli.models.formats.gguf_config import config_and_tokenizer
from hetegen_cli.models.formats.gguf_read import read_gguf_layout
path = Path(sys.argv[1])
with tempfile.TemporaryDirectory() as out:
    config_and_tokenizer(path, read_gguf_layout(path), Path(out))
"""


_REPORT = "\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def _child_peak(code: str, *args: str, env: dict | None = None) -> tuple[int, str]:
    """(peak RSS in bytes of a fresh child running `code`, its other stdout): the child
    prints its own ru_maxrss last (Linux: kilobytes)."""
    done = subprocess.run(
        [sys.executable, "-c", code + _REPORT, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    *lines, peak = done.stdout.strip().splitlines()
    return int(peak) * 1024, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hetegen-rss"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"rss-q4_k_m-{args.layers}l.gguf"
    env = {**os.environ, "HETEGEN_HOME": str(workdir / "home"), "HETEGEN_NO_PROGRESS": "1"}
    if not path.is_file():  # in a child too: a forked child's ru_maxrss starts at this process's
        config = json.dumps({**CONFIG, "num_hidden_layers": args.layers})
        _child_peak(WRITE, config, str(path), env=env)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # what a child may inherit
    fixed, _ = _child_peak(FIXED, str(path), env=env)
    peak, folder = _child_peak(CONVERT, str(path), env=env)
    size = path.stat().st_size
    out = Path(folder)
    doc = {
        "gguf": str(path),
        "gguf_bytes": size,
        "converted_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "peak_rss_bytes": peak,
        "peak_over_gguf": round(peak / size, 3),
        "fixed_rss_bytes": fixed,
        "peak_above_fixed_over_gguf": round((peak - fixed) / size, 3),
        "parent_rss_bytes": own,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
    print(f"GGUF file             {mb(size)} ({path})")
    print(f"converted folder      {mb(doc['converted_bytes'])} ({out})")
    print(f"peak RSS, converting  {mb(peak)} = {doc['peak_over_gguf']}x the file")
    print(f"peak RSS, fixed part  {mb(fixed)} (imports, config and tokenizer; no tensors)")
    print(f"conversion above it   {mb(peak - fixed)} = {doc['peak_above_fixed_over_gguf']}x the file")
    print(f"(a child's peak may include up to {mb(own)}, this script's own size when it started it)")


if __name__ == "__main__":
    main()
