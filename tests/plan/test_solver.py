"""The solver: splits, residency, memory, predictions.

Pure tests (no GPU, no weights): model shapes come from presets, hardware from made-up rates.
"""

from __future__ import annotations

import pytest

from hetegen_cli.core.errors import InputError, PlanError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan import residency, solver
from hetegen_cli.plan.document import ROW_GRANULARITY, Plan, round_rows
from hetegen_cli.plan.memory import workspace_bytes
from hetegen_cli.plan.request import PlanRequest
from tests.fakes import DESKTOP_RATES, GB, make_profile, simple_rates

MiB, GiB = 2**20, 2**30


def spec(name: str = "opt-125m"):
    return spec_from_config(preset_config(name), name)


def request(**over) -> PlanRequest:
    base = dict(
        prompt_len=512, max_new_tokens=64, batch_size=1, reserve_bytes=64 * MiB, cpu_budget_bytes=64 * GiB
    )
    base.update(over)
    return PlanRequest(**base)


def gpu_sum(plan: Plan) -> int:
    return sum(v or 0 for k, v in plan.memory.gpu.to_dict().items() if k != "total_bytes")


def minimum(sp, req) -> int:
    lins = list(sp.linears) + ([] if sp.tie_word_embeddings else [sp.lm_head])
    return (
        req.reserve_bytes
        + sp.fixed_bytes
        + sp.kv_cache_bytes(req.prompt_len + req.max_new_tokens, req.batch_size)
        + workspace_bytes(sp, req)
        + max(lin.weight_bytes for lin in lins)
    )


# --- splits --------------------------------------------------------------------------------


def test_decode_split_is_two_thirds_rounded_and_prefill_near_zero():
    sp = spec()
    req = request(gpu_budget_bytes=minimum(sp, request()))
    plan = solver.solve(sp, simple_rates(gpu_flops_per_s=100e12), req)
    split = [p for p in plan.placements if not p.resident]
    assert split
    for p in split:
        assert p.cpu_rows_decode == round_rows(2 / 3, p.out_features)
        assert p.cpu_rows_decode % ROW_GRANULARITY == 0
        assert p.cpu_fraction_prefill < 0.1
    assert plan.runtime.cpu_dtypes == ("float16", "float16") and plan.runtime.requires_gpu


def test_every_split_linear_is_balanced_within_the_rounding():
    """The per-linear objective (the fallback) balances each split linear on its own."""
    sp = spec("llama-2-7b")
    rates = DESKTOP_RATES
    plan = solver.solve(sp, rates, request(gpu_budget_bytes=6 * GiB, objective="per-linear"))
    checked = 0
    for p, est in zip(plan.placements, plan.estimates, strict=False):
        if p.resident:
            continue
        for phase, n in (("prefill", 512), ("decode", 1)):
            t = getattr(est, phase)
            rows = p.cpu_rows(phase)
            if 0 < rows < p.out_features:
                slack = (
                    ROW_GRANULARITY
                    / 2
                    * (
                        cm.cpu_row_s(rates, p.in_features, n)
                        + cm.transfer_row_s(rates, p.in_features)
                        + cm.gpu_row_s(rates, p.in_features, n)
                    )
                )
                assert abs(t.cpu_s - (t.transfer_s + t.gpu_s)) <= 1.0001 * slack
                checked += 1
    assert checked > 100


# --- memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt-125m", "llama-2-7b"])
def test_budget_is_respected_and_more_memory_is_never_slower(name):
    sp = spec(name)
    rates = simple_rates(
        cpu_call_s=30e-6,
        pcie_copy_s=10e-6,
        gpu_call_s=8e-6,
        gpu_bytes_per_s=900 * GB,
        gpu_flops_per_s=80e12,
        dram_bytes_per_s=70 * GB,
    )
    low = minimum(sp, request())
    top = low + sum(lin.weight_bytes for lin in sp.linears) + sp.lm_head.weight_bytes
    previous = None
    for k in range(31):
        budget = low + (top - low) * k // 30
        plan = solver.solve(sp, rates, request(gpu_budget_bytes=budget))
        assert plan.memory.gpu.total_bytes == gpu_sum(plan) <= budget
        assert plan.budget.gpu_unused_bytes == budget - gpu_sum(plan)
        for p in plan.placements:
            assert 0 <= p.cpu_rows_prefill <= p.out_features
            assert not (p.resident and p.max_cpu_rows)
        streamed = [p.max_gpu_stream_rows * p.in_features * 2 for p in plan.placements]
        assert plan.memory.gpu.staging_bytes == plan.runtime.staging_buffers * max(streamed)
        total = plan.predictions.hetegen.total_s
        if previous is not None:
            assert total <= previous * (1 + 1e-12)
        previous = total
    assert plan.split_count == 0 and any("plain GPU inference" in w for w in plan.warnings)


def test_budget_below_minimum_names_the_minimum():
    sp = spec()
    req = request(gpu_budget_bytes=minimum(sp, request()))
    plan = solver.solve(sp, simple_rates(), req)
    need = plan.budget.gpu_minimum_bytes
    one_buffer = max(
        p.max_gpu_stream_rows * p.in_features * 2
        for p in solver.solve(sp, simple_rates(), request(gpu_budget_bytes=need)).placements
    )
    assert need == (
        req.reserve_bytes + sp.fixed_bytes + sp.kv_cache_bytes(576, 1) + workspace_bytes(sp, req) + one_buffer
    )
    with pytest.raises(PlanError) as info:
        solver.solve(sp, simple_rates(), request(gpu_budget_bytes=need - 1))
    text = info.value.message
    assert "fixed" in text and "KV cache" in text and "staging buffer" in text and "reserve" in text
    from hetegen_cli.core.units import format_bytes

    assert format_bytes(need) in text and format_bytes(need) in info.value.hint


def test_residency_greedy_by_g_with_skips():
    # overheads make small matrices rank first (higher T_cpu per byte)
    rates = simple_rates(cpu_call_s=1e-4)
    sp = spec()
    items = [residency.candidate(cm.PhaseRates.of(rates), lin, request()) for lin in sp.linears]
    q = next(i for i in items if i.spec.role == "q")
    fc1 = next(i for i in items if i.spec.role == "fc1")
    assert q.priority_g > fc1.priority_g
    # room for exactly two q-sized weights beside one staging buffer of fc1's size
    room = 2 * q.spec.weight_bytes + max(i.stream_bytes for i in items)
    chosen = residency.choose_resident(items, room, buffers=1)
    assert len(chosen) == 2
    assert all(".layers.0.self_attn" in n for n in chosen)  # tie-break: layer index, then name


def test_untied_lm_head_resident_when_it_fits_else_split():
    sp = spec("llama-2-7b")
    rates = simple_rates(gpu_bytes_per_s=900 * GB, gpu_flops_per_s=80e12)
    low = minimum(sp, request())
    tight = solver.solve(sp, rates, request(gpu_budget_bytes=low))
    assert not tight.runtime.lm_head_on_gpu
    assert tight.placements[-1].name == "lm_head" and not tight.placements[-1].resident
    roomy = solver.solve(sp, rates, request(gpu_budget_bytes=low + 2 * sp.lm_head.weight_bytes))
    assert roomy.runtime.lm_head_on_gpu
    assert "lm_head" not in [p.name for p in roomy.placements]
    assert roomy.memory.gpu.lm_head_bytes == sp.lm_head.weight_bytes


def test_host_memory_over_budget_is_an_error_with_numbers():
    sp = spec()
    req = request(gpu_budget_bytes=minimum(sp, request()), cpu_budget_bytes=10 * MiB)
    with pytest.raises(PlanError, match="host memory"):
        solver.solve(sp, simple_rates(), req)
    # a float32 CPU copy of the CPU rows is counted on top of the fp16 rows some phase streams
    # (rows [k_min, out)): exactly what the engine allocates (plan.memory.held_rows)
    plan = solver.solve(sp, simple_rates(cpu_dtype="float32"), request(gpu_budget_bytes=req.gpu_budget_bytes))
    host = plan.memory.host
    split = [p for p in plan.placements if not p.resident]
    assert any(min(p.cpu_rows_prefill, p.cpu_rows_decode) > 0 for p in split)
    assert host.weights_bytes == sum(
        (p.out_features - min(p.cpu_rows_prefill, p.cpu_rows_decode)) * p.in_features * 2 for p in split
    )
    assert host.cpu_copy_bytes == sum(p.max_cpu_rows * p.in_features * 4 for p in split)


def test_warns_when_the_whole_model_would_fit_but_the_budget_forces_offload():
    sp = spec()
    plan = solver.solve(
        sp,
        simple_rates(),
        request(gpu_budget_bytes=minimum(sp, request())),
        gpu_free_bytes=8 * GiB,
        gpu_total_bytes=8 * GiB,
    )
    assert any("would fit" in w for w in plan.warnings)


def test_cpu_only_profile_gives_an_all_cpu_plan_with_a_note():
    sp = spec("llama-2-7b")
    plan = solver.make_plan(sp, make_profile(gpu=False), request())
    assert not plan.runtime.requires_gpu and plan.runtime.staging_buffers == 0
    assert all(p.cpu_rows_prefill == p.cpu_rows_decode == p.out_features for p in plan.placements)
    assert all(p.cpu_fraction_decode == 1.0 and not p.resident for p in plan.placements)
    assert plan.placements[-1].name == "lm_head"
    assert any("no GPU" in n for n in plan.notes)
    assert plan.memory.gpu.total_bytes == 0
    assert plan.predictions.offload is None and plan.predictions.layer_split is None
    assert plan.predictions.hetegen.decode_s_per_token == plan.predictions.cpu_only.decode_s_per_token


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(prompt_len=0), "--prompt-len"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(batch_size=0), "--batch-size"),
        (dict(prompt_len=2000, max_new_tokens=100), "context"),
    ],
)
def test_bad_lengths_are_input_errors(over, match):
    with pytest.raises(InputError, match=match):
        solver.solve(spec(), simple_rates(), request(gpu_budget_bytes=GiB, **over))


# --- predictions checked against independent formulas -------------------------------------


def _attention_cpu(sp, req, phase, layers, rates):
    q, c = (
        (req.prompt_len, req.prompt_len)
        if phase == "prefill"
        else (1, req.prompt_len + req.max_new_tokens / 2)
    )
    flops = 4 * layers * q * c * sp.num_heads * sp.head_dim
    kv = 2 * layers * sp.num_kv_heads * sp.head_dim * c * 2
    return max(flops / rates.cpu_flops_per_s, kv / rates.dram_bytes_per_s)


def test_alternative_predictions_match_their_formulas():
    sp = spec()  # opt-125m, fp16, tied head
    rates = simple_rates(dram_bytes_per_s=70 * GB)  # GPU infinitely fast, no overheads
    req = request(gpu_budget_bytes=minimum(sp, request()) + 40 * MiB)
    plan = solver.solve(sp, rates, req)
    pred = plan.predictions
    host = [p for p in plan.placements if not p.resident]
    w_host = sum(p.out_features * p.in_features * 2 for p in host)
    # pure offload: every host byte crosses PCIe, the GPU math is free
    assert pred.offload.decode_s_per_token == pytest.approx(w_host / (25 * GB), rel=1e-9)
    # hetegen: CPU and PCIe add up, up to the row rounding
    assert pred.hetegen.decode_s_per_token == pytest.approx(w_host / (75 * GB), rel=0.01)
    # CPU-only: every linear at 50 GB/s + the tied head + attention on the CPU
    w_all = sum(lin.weight_bytes for lin in sp.linears) + sp.lm_head.weight_bytes
    cpu_dec = w_all / (50 * GB) + _attention_cpu(sp, req, "decode", sp.num_layers, rates)
    assert pred.cpu_only.decode_s_per_token == pytest.approx(cpu_dec, rel=1e-9)
    cpu_pre = (
        sum(2 * 512 * lin.out_features * lin.in_features for lin in sp.linears) / 1e12
        + sp.lm_head.weight_bytes / (50 * GB)
        + _attention_cpu(sp, req, "prefill", sp.num_layers, rates)
    )
    assert pred.cpu_only.prefill_s == pytest.approx(cpu_pre, rel=1e-9)
    # static layer split: whole layers (weights + their KV) on the GPU while they fit
    layer_bytes = sum(lin.weight_bytes for lin in sp.linears if lin.layer_index == 0)
    kv_layer = sp.kv_cache_bytes(576, 1) // sp.num_layers
    room = req.gpu_budget_bytes - req.reserve_bytes - sp.fixed_bytes - workspace_bytes(sp, req)
    k = min(sp.num_layers, room // (layer_bytes + kv_layer))
    cpu_layers = sp.num_layers - k
    ls = pred.layer_split
    assert ls.gpu_layers == k
    assert ls.decode_s_per_token == pytest.approx(
        cpu_layers * layer_bytes / (50 * GB) + _attention_cpu(sp, req, "decode", cpu_layers, rates), rel=1e-9
    )
    # end-to-end = generated tokens / (prefill + 63 decode steps)
    for _, fig in pred.items():
        total = fig.prefill_s + 63 * fig.decode_s_per_token
        assert fig.end_to_end_tokens_per_s == pytest.approx(64 / total)
    # bounds: W_gpu / B_hbm + W_host / X
    b = plan.bounds
    assert b.w_host_bytes == w_host
    assert b.offload_s_per_token == pytest.approx(w_host / (25 * GB), rel=1e-9)
    assert b.layer_split_s_per_token == pytest.approx(w_host / (50 * GB), rel=1e-9)
    assert b.hybrid_s_per_token == pytest.approx(w_host / (70 * GB), rel=1e-9)  # min(75, 70)
