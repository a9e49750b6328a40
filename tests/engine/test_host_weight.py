"""Host weights: the engine allocates exactly what plan.memory counts, and views serve both
phases."""

from __future__ import annotations

import random

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.engine.host_weight import HostArena, HostWeight
from hetegen_cli.plan.document import LinearPlacement, round_rows
from hetegen_cli.plan.memory import host_memory


@pytest.mark.parametrize("cpu_dtype", [torch.float16, torch.float32])
def test_allocations_equal_the_memory_model(cpu_dtype):
    rng = random.Random(3)
    placements = []
    for i in range(20):
        out, inp = rng.choice([(64, 32), (200, 48), (136, 64)])
        rows = (round_rows(rng.random(), out), round_rows(rng.random(), out))
        placements.append(LinearPlacement(f"l{i}", 0, "q", out, inp, False, *rows))
    need = sum(
        HostWeight.arena_need(
            p.out_features, p.in_features, (p.cpu_rows_prefill, p.cpu_rows_decode), torch.float16, cpu_dtype
        )
        for p in placements
    )
    arena = HostArena(need, CpuBackend(), pin=True)
    hosts = [
        HostWeight.allocate(
            p.out_features,
            p.in_features,
            (p.cpu_rows_prefill, p.cpu_rows_decode),
            torch.float16,
            cpu_dtype,
            arena,
        )
        for p in placements
    ]
    want = host_memory(placements, "float16", str(cpu_dtype).removeprefix("torch."))
    assert arena.nbytes == arena.offset == want["weights_bytes"]  # aligned, exactly planned
    assert sum(h.cpu_copy_bytes for h in hosts) == want["cpu_copy_bytes"]


def test_views_of_both_phases_read_the_right_rows():
    weight = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    host = HostWeight.from_tensor(weight, (4, 8), torch.float16, torch.float32, CpuBackend(), pin=False)
    assert host.row0 == 4 and host.separate_cpu_copy
    for k in (4, 8):
        torch.testing.assert_close(host.cpu_rows(k), weight[:k])
        torch.testing.assert_close(host.gpu_rows(k).float(), weight[k:])
    with pytest.raises(ValueError):
        host.gpu_rows(2)  # rows below row0 are not held in the weights dtype
