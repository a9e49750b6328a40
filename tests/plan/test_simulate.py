"""The trace replay's discrete-event model (plan.simulate): its rules on hand-written op lists,
and equality with costmodel.pipeline_time on an engine-like op list (pure, no torch)."""

from __future__ import annotations

import itertools
import random

import pytest

from hetegen_cli.plan import costmodel as cm
from hetegen_cli.plan.replay import critical_path, run_ops
from hetegen_cli.plan.trace_pricing import carried_copies, segments


def copy(stream, what, dur, gap=0.0, direction="h2d", linear="L"):
    return {"op": "copy", "dir": direction, "stream": stream, "what": what, "linear": linear, "dur": dur,
            "gap_s": gap}  # fmt: skip


def record(stream, event):
    return {"op": "record", "stream": stream, "event": event, "gap_s": 0.0}


def wait(stream, event):
    return {"op": "wait", "stream": stream, "event": event, "gap_s": 0.0}


def sync(event, gap=0.0):
    return {"op": "sync", "event": event, "gap_s": gap}


def kernel(dur, gap=0.0, linear="L", what="matmul"):
    return {"op": "kernel", "stream": "compute", "what": what, "linear": linear, "dur": dur, "gap_s": gap}


def cpu(dur, gap=0.0, linear="L"):
    return {"op": "cpu", "linear": linear, "dur": dur, "gap_s": gap}


def ends(result):
    return {it.index: (it.start, it.end) for it in result.items if it.index >= 0}


def test_a_small_copy_queues_behind_a_big_one_on_one_engine_but_not_on_two():
    ops = [copy("copy", "weight", 10.0), copy("compute", "y", 1.0), record("compute", 1), sync(1), cpu(2.0)]
    one = run_ops(ops, copy_engines=1)
    assert ends(one)[1] == (10.0, 11.0)  # the join's copy waited for the whole weight copy
    assert one.step_s == 13.0 and one.blocked_s == 11.0
    assert one.busy_s["h2d"] == 11.0
    two = run_ops(ops, copy_engines=2)
    assert ends(two)[1] == (0.0, 1.0)
    assert two.step_s == 10.0  # the weight copy ends last; the CPU share ran 1..3
    assert two.busy_s["h2d:copy"] == 10.0 and two.busy_s["h2d:compute"] == 1.0


def test_one_engine_serves_copies_in_the_order_they_become_ready():
    # the weight copy is issued first but may start only once a kernel (5 s) is done; the y
    # copy, issued later, is ready at once and goes first
    ops = [kernel(5.0), record("compute", 1), wait("copy", 1), copy("copy", "weight", 10.0),
           copy("h2d-side", "y", 1.0)]  # fmt: skip
    result = run_ops(ops, copy_engines=1)
    assert ends(result)[3] == (5.0, 15.0)
    assert ends(result)[4] == (0.0, 1.0)
    # both ready together: the one issued first goes first, served whole
    ops = [copy("copy", "weight", 10.0), copy("compute", "y", 1.0, gap=0.0)]
    assert ends(run_ops(ops, copy_engines=1))[1] == (10.0, 11.0)


def test_a_stream_waits_for_an_event_and_runs_in_order():
    ops = [copy("copy", "weight", 3.0), record("copy", 1), wait("compute", 1), kernel(2.0), kernel(1.0)]
    result = run_ops(ops)
    times = ends(result)
    assert times[3] == (3.0, 5.0)  # after the copy's event
    assert times[4] == (5.0, 6.0)  # FIFO: after the kernel before it on the stream
    assert result.step_s == 6.0
    assert result.busy_s["gpu"] == 3.0
    # without the wait the kernel would not wait for the copy
    assert ends(run_ops([ops[0], ops[1], ops[3]]))[2] == (0.0, 2.0)


def test_the_host_blocks_on_sync_and_computes_the_cpu_share_itself():
    ops = [kernel(4.0), record("compute", 7), cpu(1.0), sync(7), cpu(2.0, gap=0.5)]
    result = run_ops(ops)
    times = ends(result)
    assert times[2] == (0.0, 1.0)  # the host runs its CPU share while the GPU works
    assert times[4] == (4.5, 6.5)  # after the sync (4.0) and its host gap
    assert result.step_s == 6.5
    assert result.blocked_s == 3.0 and result.cpu_s == 3.0 and result.host_s == 0.5
    assert result.busy_s["host"] == 3.5  # host work + CPU share; blocked time is not busy


def test_a_record_completes_when_its_stream_has_done_everything_before_it():
    ops = [kernel(3.0), kernel(2.0), record("compute", 1), sync(1)]
    result = run_ops(ops)
    assert ends(result)[2] == (5.0, 5.0)
    assert result.step_s == 5.0


def test_events_from_before_the_pass_are_complete_at_time_zero():
    ops = [wait("compute", 99), kernel(1.0), sync(98), cpu(1.0)]
    result = run_ops(ops)
    assert result.step_s == 1.0  # neither the wait nor the sync delayed anything


def test_host_gaps_scale_and_delay_what_follows():
    ops = [kernel(1.0, gap=2.0), cpu(1.0, gap=1.0)]
    assert run_ops(ops).step_s == 4.0
    assert run_ops(ops, host_scale=0.5).step_s == 2.5
    assert run_ops(ops, host_scale=0.0).step_s == 1.0


def test_the_critical_path_adds_up_to_the_step():
    ops = [copy("copy", "weight", 3.0, linear="a"), record("copy", 1), wait("compute", 1),
           kernel(2.0, linear="a"), record("compute", 2), cpu(1.0, gap=0.25), sync(2), cpu(0.5)]  # fmt: skip
    for op, label in zip(ops, ["w", "", "", "mm", "", "cpu", "", "cpu"], strict=True):
        op["label"] = label or op["op"]
    result = run_ops(ops)
    assert result.step_s == 5.5
    path = dict(result.critical)
    assert path == {"w": 3.0, "mm": 2.0, "cpu": 0.5}  # not the CPU share that ran alongside
    assert sum(path.values()) == pytest.approx(result.step_s)
    assert critical_path([], 0.0) == []


def test_to_dict_reports_fractions_and_the_path():
    result = run_ops([copy("copy", "weight", 3.0), kernel(1.0)])
    doc = result.to_dict()
    assert doc["step_s"] == 3.0
    assert doc["busy_fraction"]["h2d"] == 1.0 and doc["busy_fraction"]["gpu"] == pytest.approx(1 / 3)
    assert doc["critical_path"][0]["item"] == "weight copy" and doc["critical_path"][0]["share"] == 1.0


def test_carried_copies_and_segments_follow_the_engine_order():
    ops = [
        copy("compute", "x", 0.0, direction="d2h", linear="a"),
        record("compute", 1),
        wait("compute", 50),  # a's share, copied in the pass before
        copy("copy", "weight", 1.0, linear="b"),  # prefetch of b during a
        record("copy", 2),
        kernel(1.0, linear="a"),
        cpu(1.0, linear="a"),
        wait("compute", 2),
        kernel(1.0, linear="b"),
        copy("copy", "weight", 1.0, linear="a"),  # for the next pass
        record("copy", 3),
    ]
    assert carried_copies(ops) == [ops[9]]
    assert segments(ops, ["a", "b"]) == {"a": 0, "b": 7}
    with pytest.raises(ValueError, match="no operations of linear c"):
        segments(ops, ["a", "b", "c"])


# --- equality with the analytic pipeline --------------------------------------------------------


def engine_ops(steps: list[tuple[float, float, float]], buffers: int) -> list[dict]:
    """The op list the engine issues for these linears with two copy engines (HeteroLinear.forward
    and PrefetchScheduler): the first depth copies carried from the pass before, then per linear
    the input's copy to the host, the acquire, the next copies, the matmul, the CPU share and
    the join's copy; activation copies and host time free."""
    depth = buffers - 1
    ev = itertools.count(1)
    ops: list[dict] = []
    queue = [m for m, (_, t, _) in enumerate(steps) if t > 0]
    ready: dict[int, tuple[int, int]] = {}
    free: list[int | None] = [None] * buffers
    state = {"next": 0, "issued": 0}

    def issue() -> None:
        m = queue[state["issued"]]
        state["issued"] += 1
        b = state["next"]
        state["next"] = (b + 1) % buffers
        if free[b] is not None:
            ops.append(wait("copy", free[b]))
        ops.append(copy("copy", "weight", steps[m][1], linear=str(m)))
        e = next(ev)
        ops.append(record("copy", e))
        ready[m] = (e, b)

    for _ in range(min(depth, len(queue))):
        issue()
    for m, (c, t, g) in enumerate(steps):
        name = str(m)
        if c > 0:
            ops.append(copy("compute", "x", 0.0, direction="d2h", linear=name))
            x_ready = next(ev)
            ops.append(record("compute", x_ready))
        if t > 0:
            if depth == 0:
                issue()
            e, b = ready[m]
            ops.append(wait("compute", e))
            while state["issued"] < len(queue) and state["issued"] - queue.index(m) - 1 < depth:
                issue()
            ops.append(kernel(g, linear=name))
            free[b] = next(ev)
            ops.append(record("compute", free[b]))
        if c > 0:
            ops.append(sync(x_ready))
            ops.append(cpu(c, linear=name))
            ops.append(copy("compute", "y", 0.0, linear=name))
            ops.append(record("compute", next(ev)))
    return ops


@pytest.mark.parametrize("buffers", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_replay_equals_the_pipeline_model_with_two_copy_engines(buffers, seed):
    rng = random.Random(seed)
    steps = []
    for _ in range(40):
        kind = rng.random()
        cpu_s = 0.0 if kind < 0.2 else rng.uniform(0.1, 3.0)  # some linears stream whole
        steps.append((cpu_s, rng.uniform(0.1, 3.0), rng.uniform(0.01, 0.5)))
    ops = engine_ops(steps, buffers)
    replayed = run_ops(ops, copy_engines=2, host_scale=0.0)
    assert replayed.step_s == pytest.approx(cm.pipeline_time(steps, buffers, 2), rel=1e-9)
    # and host time only ever adds
    for op in ops:
        op["gap_s"] = 1e-3
    assert run_ops(ops, copy_engines=2).step_s > replayed.step_s
