"""The copy-engine probe (measure.gpu.copy_engine_probe): a small host-to-device copy timed
alone and while a big one runs on another stream, on a simulated GPU with one or two copy
engines, on the CPU stand-in, in the profile document and its tables, and on a real GPU."""

from __future__ import annotations

import json

import pytest
import torch

from hetegen_cli.core import devices
from hetegen_cli.core.errors import ProfileError
from hetegen_cli.measure.gpu import copy_engine_probe, copy_engines
from hetegen_cli.profile.document import validate_profile
from tests.fakes import tiny_profile

BYTES_PER_S = 25e9  # PCIe 4 x16
ISSUE_S = 5e-6  # host time to issue one call


class SimulatedGpu(devices.Backend):
    """Streams whose copies run on `engines` copy engines (1: every stream's copies queue on
    one engine, in issue order; 2: each stream has its own), on a simulated clock. Timing
    events take the time their stream's earlier work ends (or now, when it is idle); issuing
    a copy takes the host ISSUE_S."""

    name = "simulated"

    def __init__(self, engines: int) -> None:
        self.engines = engines
        self.now_s = 0.0
        self.tails: dict[int, float] = {}
        self.engine_free = [0.0, 0.0]
        self.copies: list[tuple[int, int]] = []  # (stream, bytes) in issue order

    def _issue(self) -> float:
        self.now_s += ISSUE_S
        return self.now_s

    def new_stream(self) -> int:
        stream = len(self.tails)
        self.tails[stream] = 0.0
        return stream

    def synchronize(self) -> None:
        self.now_s = max([self.now_s, *self.tails.values()])

    def empty_pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def to_device_async(self, dst, src, stream=None):
        now = self._issue()
        engine = 0 if self.engines == 1 else stream % 2
        start = max(now, self.tails[stream], self.engine_free[engine])
        end = start + src.numel() * src.element_size() / BYTES_PER_S
        self.tails[stream] = self.engine_free[engine] = end
        self.copies.append((stream, src.numel()))
        dst.copy_(src)

    def timing_event(self, stream=None):
        return max(self.now_s, self.tails[stream])


SMALL_S, BIG_S = 16384 / BYTES_PER_S, (256 << 20) / BYTES_PER_S
EPS = 1e-12  # the simulated clock's rounding


def test_one_copy_engine_queues_the_small_copy_behind_the_big_one():
    gpu = SimulatedGpu(engines=1)
    probe = copy_engine_probe(gpu, small_bytes=16384, big_bytes=256 << 20)
    assert probe["h2d_copy_engines"] == 1
    # alone: the copy's own time (plus at most one issue, which back-to-back copies hide)
    assert BIG_S - EPS <= probe["big_copy_s"] <= BIG_S + ISSUE_S
    assert SMALL_S - EPS <= probe["small_copy_alone_s"] <= SMALL_S + ISSUE_S
    # together: it waited for what was left of the big copy, almost all of it
    assert probe["small_copy_during_big_s"] > 0.99 * BIG_S
    assert probe["small_copy_during_big_s"] == pytest.approx(probe["big_copy_left_s"] + SMALL_S, rel=1e-3)
    # both sizes went over the simulated PCIe, on two streams
    assert {n for _, n in gpu.copies} == {16384, 256 << 20}
    assert len({s for s, _ in gpu.copies}) == 2


def test_two_copy_engines_let_the_small_copy_through():
    probe = copy_engine_probe(SimulatedGpu(engines=2), small_bytes=16384, big_bytes=256 << 20)
    assert probe["h2d_copy_engines"] == 2
    assert SMALL_S - EPS <= probe["small_copy_during_big_s"] <= SMALL_S + ISSUE_S
    assert probe["big_copy_left_s"] > 0.99 * BIG_S - ISSUE_S


def test_the_verdict_and_when_it_cannot_be_told():
    assert copy_engines(alone_s=1e-6, during_s=9e-3, big_left_s=1e-2) == 1
    assert copy_engines(alone_s=1e-6, during_s=2e-6, big_left_s=1e-2) == 2
    # the big copy had ended (synchronous copies, or a tiny one): no overlap, no answer
    assert copy_engines(alone_s=1e-6, during_s=1e-6, big_left_s=0.0) is None
    assert copy_engines(alone_s=1e-6, during_s=1e-6, big_left_s=1.5e-6) is None


def test_cpu_stand_in_answers_undetermined():
    probe = copy_engine_probe(devices.CpuBackend(), big_bytes=1 << 20)
    assert probe["h2d_copy_engines"] is None
    assert probe["small_copy_alone_s"] >= 0 and probe["big_copy_s"] > 0


def test_profile_document_carries_the_probe_and_the_tables_show_it(capsys):
    from hetegen_cli.cli.profile import _render_probe, render

    doc = tiny_profile(gpu_backend=devices.CpuBackend())
    probe = doc["gpu"]["copy_engine_probe"]
    assert set(probe) >= {"small_copy_alone_s", "small_copy_during_big_s", "big_copy_s", "h2d_copy_engines"}
    validate_profile(doc)
    render(doc)
    assert "Copy engines" in capsys.readouterr().out
    one = {**probe, "h2d_copy_engines": 1, "small_copy_during_big_s": 0.0101, "big_copy_s": 0.0107}
    _render_probe(devices_console(), one)
    out = capsys.readouterr().out
    assert "one copy engine" in out and "10.100" in out and "10.700" in out
    # older profiles have no probe; a bad one names its field
    old = json.loads(json.dumps(doc))
    del old["gpu"]["copy_engine_probe"]
    validate_profile(old)
    bad = json.loads(json.dumps(doc))
    bad["gpu"]["copy_engine_probe"]["h2d_copy_engines"] = 3
    with pytest.raises(ProfileError, match=r"copy_engine_probe\.h2d_copy_engines"):
        validate_profile(bad)


def test_a_failing_probe_costs_only_itself(monkeypatch, capsys):
    from hetegen_cli.cli.profile import render
    from hetegen_cli.measure import gpu as profile_gpu

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: invalid argument")

    monkeypatch.setattr(profile_gpu, "copy_engine_probe", broken)
    doc = tiny_profile(gpu_backend=devices.CpuBackend())
    validate_profile(doc)
    assert doc["gpu"]["copy_engine_probe"] is None
    assert doc["gpu"]["copy_engine_probe_error"] == "RuntimeError: CUDA error: invalid argument"
    assert doc["gpu"]["transfers"] and doc["gpu"]["concurrent"]  # the rest is measured
    render(doc)
    assert "the probe failed (RuntimeError" in capsys.readouterr().out


def devices_console():
    from hetegen_cli.core.console import stdout_console

    return stdout_console()


@pytest.mark.cuda
def test_real_gpu_probe():
    probe = copy_engine_probe(devices.get_backend("cuda"))
    assert probe["big_copy_s"] > probe["small_copy_alone_s"] > 0
    assert probe["h2d_copy_engines"] in (1, 2)
