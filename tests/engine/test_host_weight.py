"""Host weights: the engine allocates exactly what plan.memory counts, and views serve both
phases, each in its own CPU dtype."""

from __future__ import annotations

import random

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend, dtype_name
from hetegen_cli.engine.host_weight import HostArena, HostLayout, HostWeight
from hetegen_cli.plan.document import LinearPlacement, round_rows
from hetegen_cli.plan.memory import host_memory

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("cpu_dtypes", [(F16, F16), (F32, F32), (BF16, F32), (F32, F16), (BF16, BF16)])
def test_allocations_equal_the_memory_model(cpu_dtypes):
    rng = random.Random(3)
    placements = []
    for i in range(30):
        out, inp = rng.choice([(64, 32), (200, 48), (136, 64)])
        rows = [round_rows(rng.random(), out), round_rows(rng.random(), out)]
        if i % 5 == 0:
            rows[i % 2] = out  # some linears whole on the CPU in one phase
        if i % 7 == 0:
            rows = [out, out]  # and some in both
        placements.append(LinearPlacement(f"l{i}", 0, "q", out, inp, False, *rows))
    layouts = [
        HostLayout(p.out_features, p.in_features, (p.cpu_rows_prefill, p.cpu_rows_decode), F16, cpu_dtypes)
        for p in placements
    ]
    arena = HostArena(sum(layout.arena_need for layout in layouts), CpuBackend(), pin=True)
    hosts = [HostWeight.allocate(layout, arena) for layout in layouts]
    want = host_memory(placements, "float16", tuple(dtype_name(d) for d in cpu_dtypes))
    assert arena.nbytes == arena.offset == want.weights_bytes  # aligned, exactly planned
    assert sum(h.cpu_copy_bytes for h in hosts) == want.cpu_copy_bytes


def test_views_of_both_phases_read_the_right_rows():
    weight = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    host = HostWeight.from_tensor(weight, (4, 8), F16, (F32, F32), CpuBackend(), pin=False)
    assert host.row0 == 4 and list(host.copies) == [F32] and host.copies[F32].shape == (8, 4)
    for k in (4, 8):
        torch.testing.assert_close(host.cpu_rows(k, F32), weight[:k])
        torch.testing.assert_close(host.gpu_rows(k).float(), weight[k:])
    with pytest.raises(ValueError):
        host.gpu_rows(2)  # rows below row0 are not held in the weights dtype
    with pytest.raises(ValueError):
        host.cpu_rows(4, F16)  # no phase computes in the weights dtype: those rows are not held


def test_each_phase_reads_its_own_dtype_copy():
    weight = torch.randn(40, 8)
    # prefill: 16 rows in bfloat16; decode: 32 rows in float32; GPU shares from row 16
    host = HostWeight.from_tensor(weight, (16, 32), F16, (BF16, F32), CpuBackend(), pin=False)
    assert host.row0 == 16
    assert {d: c.shape[0] for d, c in host.copies.items()} == {BF16: 16, F32: 32}
    torch.testing.assert_close(host.cpu_rows(16, BF16), weight[:16].to(BF16))
    torch.testing.assert_close(host.cpu_rows(32, F32), weight[:32])
    with pytest.raises(ValueError):
        host.cpu_rows(32, BF16)  # more rows than the prefill copy holds


def test_a_phase_in_the_weights_dtype_reads_the_arena():
    weight = torch.randn(40, 8)
    # prefill in float32 (a copy), decode in the weights dtype (views of the arena, row0 = 0)
    host = HostWeight.from_tensor(weight, (32, 16), F16, (F32, F16), CpuBackend(), pin=False)
    assert host.row0 == 0 and list(host.copies) == [F32]
    assert host.cpu_rows(16, F16).data_ptr() == host.gpu_home.data_ptr()
    torch.testing.assert_close(host.cpu_rows(16, F16), weight[:16].to(F16))


def test_whole_on_the_cpu_in_other_dtypes_holds_no_weights_dtype_rows():
    weight = torch.randn(24, 8)
    host = HostWeight.from_tensor(weight, (24, 24), F32, (BF16, BF16), CpuBackend(), pin=False)
    assert host.row0 == 24 and host.gpu_home.numel() == 0
    assert host.cpu_copy_bytes == 24 * 8 * 2
