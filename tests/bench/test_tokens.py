"""The greedy-token check: first divergence, baseline choice, near ties by dtype (pure)."""

from __future__ import annotations

from hetegen_cli.bench import tokens as bench_tokens


def test_compare_tokens_reports_the_first_divergence():
    assert bench_tokens.compare_tokens([1, 2, 3], [1, 2, 3]) == (True, None)
    assert bench_tokens.compare_tokens([1, 2, 3], [1, 5, 3]) == (False, 1)
    assert bench_tokens.compare_tokens([1, 2], [1, 2, 3]) == (False, 2)


def _entry(arm: str, dtype: str, tokens=(1, 2, 3)) -> dict:
    return {"arm": arm, "status": "ok", "info": {"compute_dtype": dtype}, "tokens": list(tokens)}


def test_token_baseline_prefers_a_reference_arm_of_the_same_dtype():
    entries = {
        a: _entry(a, d)
        for a, d in (
            ("reference", "float32"),
            ("gpu", "float16"),
            ("offload", "float16"),
            ("cpu", "bfloat16"),
            ("hetegen", "float16+bfloat16"),
        )
    }
    assert bench_tokens.token_baseline("offload", entries) == "gpu"
    assert bench_tokens.token_baseline("gpu", entries) == "offload"
    assert bench_tokens.token_baseline("cpu", entries) == "reference"  # no bf16 reference
    assert bench_tokens.token_baseline("hetegen", entries) == "reference"
    assert bench_tokens.token_baseline("reference", {"reference": entries["reference"]}) is None
    only = {"reference": _entry("reference", "float32"), "cpu": _entry("cpu", "float32")}
    assert bench_tokens.token_baseline("reference", only) == "cpu"


def test_token_check_tolerance():
    def entry(tokens, dtype, top2, margin, top1=10.0):
        n = len(tokens)
        return {
            "tokens": tokens,
            "info": {"compute_dtype": dtype},
            "logits": {"top2_ids": [top2] * n, "margins": [margin] * n, "top1_logits": [top1] * n},
        }

    base = entry([1, 2], "float32", [2, 3], 0.005)
    # margin 0.005 <= 1e-3 * |10| -> a float32 near tie
    assert bench_tokens.token_check(entry([1, 3], "float32", [3, 2], 1.0), base, "ref")["verified"] is True
    far = entry([1, 2], "float32", [2, 3], 0.5)
    check = bench_tokens.token_check(entry([1, 3], "float32", [3, 2], 0.5), far, "ref")
    assert (check["verified"], check["near_tie"], check["first_divergence"]) == (False, False, 1)
    # bfloat16 on either side loosens the tolerance to 5e-2 * 10
    assert bench_tokens.token_check(entry([1, 3], "float32+bfloat16", [3, 2], 0.4), far, "ref")["verified"]
    no_logits = {"tokens": [1, 3], "info": {"compute_dtype": "float32"}}
    assert bench_tokens.token_check(no_logits, far, "ref")["verified"] is None
    assert bench_tokens.token_check(no_logits, None, None)["compared_with"] is None
