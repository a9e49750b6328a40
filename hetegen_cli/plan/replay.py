"""The discrete-event core of trace replay (pure Python; plan.simulate prices the ops).

Replays an op list (engine.trace's records, each with a `duration_s` set by plan.simulate) in
a model of one GPU machine:

- the **host** (main thread) runs the recorded host gaps (times `host_scale`), issues the ops
  in order, blocks on `sync` until the event completes, and computes each CPU share itself
  (`cpu` ops: the host is busy for their duration);
- **streams** ("compute", "copy") are FIFO: an op starts once it has been issued, the previous
  op of its stream is done, and (a `wait`) its event has completed; a `record` completes when
  every earlier op of its stream has;
- **resources**: the GPU runs compute-stream kernels one at a time; host-to-device copies use
  one copy engine shared by both streams (`copy_engines` 1: served whole, in the order they
  became ready) or one engine per stream (2); device-to-host copies one engine of their own.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any

HOST, GPU, D2H = "host", "gpu", "d2h"
H2D_SHARED = "h2d"


@dataclass(eq=False)
class Item:
    """One timed piece of work: a host gap, a host-side op, or a stream op."""

    index: int  # position in the op list (-1: a host gap)
    lane: str
    kind: str
    label: str  # what the critical path aggregates by
    start: float = 0.0
    end: float = 0.0
    pred: Item | None = None  # the item whose end set this one's start (critical path)
    linear: str | None = None
    # stream ops, while queued
    issue: float = 0.0
    issue_pred: Item | None = None
    stream: str | None = None
    event: int | None = None
    dur: float = 0.0
    next_pass: bool = False  # a copy issued for the next pass: not part of this step's end


@dataclass
class Replay:
    """The replay of one step: its seconds, every lane's busy seconds, the timed work."""

    step_s: float
    busy_s: dict[str, float]
    items: list[Item] = field(repr=False)
    critical: list[tuple[str, float]] = field(default_factory=list)  # label -> seconds on the path
    lanes: tuple[str, ...] = ()
    host_s: float = 0.0  # host gaps (times host_scale)
    cpu_s: float = 0.0  # CPU shares on the main thread
    blocked_s: float = 0.0  # the main thread blocked on events

    def busy_fraction(self) -> dict[str, float]:
        return {lane: (s / self.step_s if self.step_s > 0 else 0.0) for lane, s in self.busy_s.items()}

    def intervals(self) -> list[Item]:
        """Items with a duration, for a timeline."""
        return [i for i in self.items if i.end > i.start]

    def to_dict(self, top: int = 8) -> dict[str, Any]:
        return {
            "step_s": self.step_s,
            "busy_s": dict(self.busy_s),
            "busy_fraction": self.busy_fraction(),
            "host_work_s": self.host_s,
            "cpu_share_s": self.cpu_s,
            "host_blocked_s": self.blocked_s,
            "critical_path": [
                {"item": label, "seconds": s, "share": s / self.step_s if self.step_s > 0 else 0.0}
                for label, s in self.critical[:top]
            ],
        }


def h2d_lane(stream: str, copy_engines: int) -> str:
    """The engine a host-to-device copy on `stream` uses: one for all, or with two the CPU
    results' (the compute stream's) and the weights' (every other stream's)."""
    if copy_engines < 2:
        return H2D_SHARED
    return "h2d:compute" if stream == "compute" else "h2d:copy"


class _Sim:
    """The event loop behind `run_ops` (see the module docstring for the rules)."""

    def __init__(self, ops: list[dict], copy_engines: int, host_scale: float) -> None:
        self.ops = ops
        self.engines = copy_engines
        self.scale = host_scale
        self.recorded = {op["event"] for op in ops if op["op"] == "record"}
        self.done: dict[int, Item] = {}  # event -> its record item (end = completion)
        self.items: list[Item] = []
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        # host
        self.host_t = 0.0
        self.host_pred: Item | None = None
        self.host_i = 0
        self.host_state = "run"  # run | sleep | block
        self.gap_done = False
        self.block_event: int | None = None
        # streams and resources
        self.queues: dict[str, deque[Item]] = {}
        self.stream_busy: dict[str, bool] = {}
        self.stream_last: dict[str, Item | None] = {}
        self.res_busy: set[str] = set()
        self.res_last: dict[str, Item] = {}

    def push(self, t: float, what: str, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, what, payload))

    def run(self) -> float:
        self.advance()
        while self.heap:
            self.now = self.heap[0][0]
            while self.heap and self.heap[0][0] == self.now:
                _, _, what, item = heapq.heappop(self.heap)
                if what == "wake":
                    if self.host_state == "sleep":
                        self.host_state = "run"
                else:  # a stream op finished
                    self.stream_busy[item.stream] = False
                    self.stream_last[item.stream] = item
                    lane = item.lane
                    self.res_busy.discard(lane)
                    self.res_last[lane] = item
            self.advance()
        stuck = [s for s, q in self.queues.items() if q]
        if self.host_i < len(self.ops) or stuck:
            where = self.ops[min(self.host_i, len(self.ops) - 1)] if self.ops else {}
            raise ValueError(
                f"the trace cannot be replayed: it waits for an event that never completes "
                f"(host at op {self.host_i} {where.get('op')!r}, streams {stuck})"
            )
        return max([self.host_t, *(i.end for i in self.items if not i.next_pass)])

    def advance(self) -> None:
        progress = True
        while progress:
            progress = self.step_host()
            progress = self.step_streams() or progress

    # the main thread
    def step_host(self) -> bool:
        progress = False
        if self.host_state == "block":
            rec = self.done.get(self.block_event)
            if rec is None:
                return False
            self._unblock(rec)
            progress = True
        while self.host_state == "run" and self.host_i < len(self.ops):
            op = self.ops[self.host_i]
            if not self.gap_done:
                self.gap_done = True
                gap = float(op.get("gap_s") or 0.0) * self.scale
                if gap > 0:
                    item = Item(-1, HOST, "host", "host work", self.host_t, self.host_t + gap, self.host_pred)
                    self.items.append(item)
                    self.host_t, self.host_pred = item.end, item
                    if self.host_t > self.now:
                        self.host_state = "sleep"
                        self.push(self.host_t, "wake")
                        return True
            kind = op["op"]
            if kind == "sync":
                event = op.get("event")
                if event in self.recorded:
                    rec = self.done.get(event)
                    if rec is None:
                        self.host_state, self.block_event = "block", event
                        return True
                    self._unblock(rec, advance=False)
            elif kind == "cpu":
                dur = float(op.get("dur") or 0.0)
                item = Item(self.host_i, HOST, "cpu", op.get("label", "CPU share"), linear=op.get("linear"))
                item.start, item.end, item.pred = self.host_t, self.host_t + dur, self.host_pred
                self.items.append(item)
                self.host_t, self.host_pred = item.end, item
                if dur > 0:
                    self.host_i += 1
                    self.gap_done = False
                    self.host_state = "sleep"
                    self.push(self.host_t, "wake")
                    return True
            elif kind in ("copy", "kernel", "record", "wait"):
                self._issue(op)
            elif kind != "pass":
                raise ValueError(f"unknown trace op {kind!r}")
            self.host_i += 1
            self.gap_done = False
            progress = True
        return progress

    def _unblock(self, rec: Item, advance: bool = True) -> None:
        if rec.end > self.host_t:
            self.items.append(Item(-1, HOST, "blocked", "blocked", self.host_t, rec.end, rec))
            self.host_t, self.host_pred = rec.end, rec
        if advance:  # resumed from a block: the sync op is done
            self.host_state = "run"
            self.host_i += 1
            self.gap_done = False

    def _issue(self, op: dict) -> None:
        kind = op["op"]
        stream = op.get("stream") or "compute"
        if kind == "copy":
            lane = D2H if op.get("dir") == "d2h" else h2d_lane(stream, self.engines)
            what = {"weight": "weight copy", "y": "y copy", "x": "x copy", "experts": "expert copy"}.get(
                op.get("what"), "copy"
            )
        elif kind == "kernel":
            lane, what = GPU, op.get("kind") or op.get("what") or "kernel"
        else:
            lane, what = "", kind
        item = Item(
            self.host_i,
            lane,
            what,
            op.get("label", what),
            linear=op.get("linear"),
            issue=self.host_t,
            issue_pred=self.host_pred,
            stream=stream,
            event=op.get("event"),
            dur=float(op.get("dur") or 0.0),
            next_pass=bool(op.get("next_pass")),
        )
        self.items.append(item)
        self.queues.setdefault(stream, deque()).append(item)
        self.stream_busy.setdefault(stream, False)
        self.stream_last.setdefault(stream, None)

    # the streams and the resources they share
    def step_streams(self) -> bool:
        progress = False
        candidates: dict[str, list[tuple[float, int, Item, Item | None]]] = {}
        for stream, queue in self.queues.items():
            while queue and not self.stream_busy[stream]:
                item = queue[0]
                ready, pred = item.issue, item.issue_pred
                last = self.stream_last[stream]
                if last is not None and last.end > ready:
                    ready, pred = last.end, last
                if item.kind == "wait" and item.event in self.recorded:
                    rec = self.done.get(item.event)
                    if rec is None:
                        break
                    if rec.end > ready:
                        ready, pred = rec.end, rec
                if item.kind in ("wait", "record"):
                    item.start = item.end = ready
                    item.pred = pred
                    queue.popleft()
                    self.stream_last[stream] = item
                    if item.kind == "record":
                        self.done[item.event] = item
                    progress = True
                    continue
                candidates.setdefault(item.lane, []).append((ready, item.index, item, pred))
                break
        for lane, waiting in candidates.items():
            if lane in self.res_busy:
                continue
            ready, _, item, pred = min(waiting, key=lambda c: (c[0], c[1]))
            last = self.res_last.get(lane)
            if last is not None and last.end > ready:
                ready, pred = last.end, last
            item.start, item.pred = ready, pred
            item.end = ready + item.dur
            self.res_busy.add(lane)
            self.stream_busy[item.stream] = True
            self.queues[item.stream].popleft()
            self.push(item.end, "done", item)
            progress = True
        return progress


def run_ops(ops: list[dict], *, copy_engines: int = 1, host_scale: float = 1.0) -> Replay:
    """Replay an op list whose copies, kernels and CPU shares carry their seconds (`dur`).
    Hand-written lists (tests) use it directly; `replay` prices a trace first."""
    if copy_engines < 1:
        raise ValueError("copy_engines must be 1 or more")
    sim = _Sim(ops, copy_engines, host_scale)
    step = sim.run()
    busy: dict[str, float] = {HOST: 0.0, GPU: 0.0, D2H: 0.0}
    for lane in (H2D_SHARED,) if copy_engines < 2 else ("h2d:copy", "h2d:compute"):
        busy[lane] = 0.0
    host_s = cpu_s = blocked_s = 0.0
    for item in sim.items:
        d = item.end - item.start
        if item.lane == HOST:
            if item.kind == "blocked":
                blocked_s += d
                continue
            if item.kind == "cpu":
                cpu_s += d
            else:
                host_s += d
        if item.lane:
            busy[item.lane] = busy.get(item.lane, 0.0) + d
    return Replay(
        step_s=step,
        busy_s=busy,
        items=sim.items,
        critical=critical_path(sim.items, step),
        lanes=tuple(busy),
        host_s=host_s,
        cpu_s=cpu_s,
        blocked_s=blocked_s,
    )


def critical_path(items: list[Item], step: float) -> list[tuple[str, float]]:
    """Seconds per label along the chain of binding constraints that ends the step, largest
    first: what the step waited on."""
    last = None
    for item in items:  # the latest end; among equals, the last issued
        if item.kind != "blocked" and not item.next_pass and (last is None or item.end >= last.end):
            last = item
    totals: dict[str, float] = {}
    seen = set()
    while last is not None and id(last) not in seen:
        seen.add(id(last))
        d = last.end - last.start
        if d > 0:
            totals[last.label] = totals.get(last.label, 0.0) + d
        last = last.pred
    return sorted(totals.items(), key=lambda kv: -kv[1])
