"""The memory model: host bytes per split linear, the whole model on the GPU (pure)."""

from __future__ import annotations

from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.document import LinearPlacement
from hetegen_cli.plan.memory import (
    ARENA_ALIGN,
    arena_bytes,
    default_gpu_budget,
    held_rows,
    host_memory,
    whole_model_gpu_bytes,
    workspace_bytes,
)
from hetegen_cli.plan.request import PlanRequest

GiB = 2**30


def test_held_rows_keep_streamed_rows_once_and_a_copy_per_other_cpu_dtype():
    f16, f32, bf16 = "float16", "float32", "bfloat16"
    # CPU in the weights dtype: every row once, in the weights dtype
    assert held_rows(100, (20, 60), (f16, f16), f16) == (0, {})
    # rows [20, 100) in the weights dtype (some phase streams them), rows [0, 60) in float32
    assert held_rows(100, (20, 60), (f32, f32), f16) == (20, {f32: 60})
    assert held_rows(100, (100, 100), (f32, f32), f16) == (100, {f32: 100})  # all-CPU: copy only
    # a format per phase: a copy each, sized by its own phase
    assert held_rows(100, (20, 60), (bf16, f32), f16) == (20, {bf16: 20, f32: 60})
    assert held_rows(100, (100, 100), (bf16, f32), f32) == (0, {bf16: 100})  # decode reads fp32
    # a phase without CPU rows needs no copy in its format
    assert held_rows(100, (0, 60), (bf16, f32), f16) == (0, {f32: 60})


def test_host_memory_sums_held_rows_and_skips_resident_linears():
    p = [
        LinearPlacement("a", 0, "q", 100, 10, False, 20, 60),
        LinearPlacement("b", 0, "k", 50, 10, True, 0, 0),
        LinearPlacement("c", 0, "v", 40, 10, False, 40, 40),
    ]
    same = host_memory(p, "float16", ("float16", "float16"), other_bytes=7)
    weights = arena_bytes(100 * 10 * 2) + arena_bytes(40 * 10 * 2)  # each aligned in the arena
    assert same.to_dict() == {
        "weights_bytes": weights,
        "cpu_copy_bytes": 0,
        "other_bytes": 7,
        "total_bytes": weights + 7,
    }
    mixed = host_memory(p, "float16", ("float32", "float32"))
    assert mixed.weights_bytes == arena_bytes(80 * 10 * 2)  # rows [20, 100); c: none streamed
    assert mixed.cpu_copy_bytes == (60 + 40) * 10 * 4
    per_phase = host_memory(p, "float16", ("bfloat16", "float32"))
    assert per_phase.weights_bytes == mixed.weights_bytes
    assert per_phase.cpu_copy_bytes == (20 + 40) * 10 * 2 + (60 + 40) * 10 * 4


def test_arena_alignment():
    assert ARENA_ALIGN == 64 and arena_bytes(0) == 0 and arena_bytes(1) == 64 and arena_bytes(128) == 128


def test_whole_model_on_the_gpu_counts_weights_kv_workspace_and_reserve():
    spec = spec_from_config(preset_config("opt-125m"), "opt-125m")
    req = PlanRequest(prompt_len=100, max_new_tokens=28, reserve_bytes=GiB)
    need = whole_model_gpu_bytes(spec, req)
    assert need == (spec.total_weight_bytes + spec.kv_cache_bytes(128) + workspace_bytes(spec, req) + GiB)
    # float32 doubles everything but the reserve
    assert whole_model_gpu_bytes(spec, req, "float32") == 2 * (need - GiB) + GiB


def test_default_budget_leaves_a_margin_of_the_total():
    assert default_gpu_budget(None, None) == 0
    assert default_gpu_budget(10 * GiB, 20 * GiB) == 9 * GiB
