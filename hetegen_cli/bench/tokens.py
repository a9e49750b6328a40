"""The greedy-token check of `hetegen bench` (pure Python).

Every arm's greedy tokens are compared with a reference-like arm. Where they first differ the
context is still identical, so the step is judged from the top-2 logits both arms recorded: a
divergence on a near tie (the other arm's token ranked second within the dtype's tolerance) is
rounding, not an error; otherwise the arm's timing does not count.
"""

from __future__ import annotations

from hetegen_cli.core.dtypes import greedy_tolerance

#: arms whose greedy tokens serve as the reference, in order of preference
TOKEN_BASELINES = ("reference", "gpu", "offload", "accelerate")


def compare_tokens(a: list[int], b: list[int]) -> tuple[bool, int | None]:
    """(equal, first index where they differ or None)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return False, i
    if len(a) != len(b):
        return False, min(len(a), len(b))
    return True, None


def near_tie(a: dict, b: dict, pos: int, tol: float) -> bool | None:
    """At the first divergence `pos` (identical context so far): did either arm rank the
    other's token second, within `tol` of its first? None without logit records."""
    la, lb = a.get("logits"), b.get("logits")
    if not la or not lb or pos >= min(len(la["margins"]), len(lb["margins"])):
        return None
    for rec, other in ((la, b["tokens"][pos]), (lb, a["tokens"][pos])):
        if other in rec["top2_ids"][pos] and rec["margins"][pos] <= tol * max(
            1.0, abs(rec["top1_logits"][pos])
        ):
            return True
    return False


def token_check(e: dict, base: dict | None, base_name: str | None) -> dict:
    """tokens_match, first_divergence and whether a divergence is a near tie (verified)."""
    check = {
        "compared_with": base_name,
        "tokens_match": None,
        "first_divergence": None,
        "same_dtype": None,
        "near_tie": None,
        "tolerance": None,
        "verified": None,
    }
    if base is None:
        return check
    match, first = compare_tokens(e["tokens"], base["tokens"])
    da, db = e["info"].get("compute_dtype"), base["info"].get("compute_dtype")
    tol = greedy_tolerance(da, db)
    tie = None if match else near_tie(e, base, first, tol)
    check.update(
        tokens_match=match,
        first_divergence=first,
        same_dtype=da == db,
        near_tie=tie,
        tolerance=tol,
        verified=True if match else tie,
    )
    return check


def token_baseline(arm: str, entries: dict) -> str | None:
    """The arm to check `arm`'s tokens against: a reference-like arm of the same compute
    dtype if one ran, else any reference-like arm, else any other arm of the same dtype."""
    ok = {a: e for a, e in entries.items() if e.get("status") == "ok" and a != arm}
    dtype = entries[arm]["info"].get("compute_dtype")
    same = [a for a in TOKEN_BASELINES if a in ok and ok[a]["info"].get("compute_dtype") == dtype]
    other = [a for a in TOKEN_BASELINES if a in ok]
    rest = [a for a, e in ok.items() if e["info"].get("compute_dtype") == dtype]
    return (same or other or rest or [None])[0]
