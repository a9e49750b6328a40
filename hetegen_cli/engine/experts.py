"""The routed experts of a mixture-of-experts layer, each computed where the plan put it
(docs/engine.md, "Experts").

`HeteroExperts` replaces transformers' experts module (`Qwen3MoeExperts`, `MixtralExperts`,
...: fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], called with the hidden states
[T, H] and the router's choice, `top_k_index` and `top_k_weights` [T, k]). The router, the
shared expert and the sum stay transformers' own. Experts on the GPU side are held whole on
the backend's device; the others in host RAM, in the decode CPU format, and the CPU computes
only those some token chose: the activations cross PCIe, the weights never do.

One forward, on a GPU: the choice comes to the host (one small copy, the step waits for it,
as transformers' own loop does), the hidden states and weights are copied to the host on the
compute stream, the GPU experts' kernels are queued after that copy, and the main thread
computes the CPU experts while they run; the CPU's sum goes back with one copy and is added.
Tokens are grouped per expert exactly as transformers groups them, and each side adds its
experts in ascending order, so with top-2 routing the sum is transformers' bit for bit.

Quantized experts (a quantized folder's, models.shapes.experts.quant_expert_key): the GPU side
holds each expert's stored parts on the device and dequantizes one part at a time into the
weights dtype before its matmul (engine.quant_host.DequantLinear); the CPU side computes each
of its experts with QuantLinear's int8/int4 kernels (models.formats.quant_experts.CpuExpert,
the plain quantized model's own), so an all-CPU plan gives that model's numbers.

Prefill streaming (a layer placed with `stream_prefill`): in prefill the layer's CPU-side
experts are computed on the GPU instead. Their weights, held pinned as the CPU holds them
(floating-point experts in the CPU format; quantized ones as stored, on hetegen's CPU kernels,
dequantized on the GPU one part at a time, as GPU-side experts are), cross PCIe one expert at a
time into one of two staging slots shared by every layer (`ExpertStream`) on a side stream:
the next expert's copy runs while the GPU computes the current one, each copy waits until the
computation that last read its slot is done, and each computation waits for its copy. An
expert whose tensors all lie in one pinned block crosses in one copy of it. A quantized layer
whose CPU experts sit in torch's packed layout (no hetegen kernels on this CPU) has no stored
form to copy and is computed on the CPU instead (and not split in decode either).

Decode split (a layer placed with `split_units` k): each CPU-side expert is held as two experts
by intermediate units, its first k units (gate and up rows, down columns) and the rest, whose
outputs add up to the whole expert's. In decode, a chosen CPU-side expert's first k units cross
PCIe through the same staging slots and the GPU computes them while the CPU computes the rest:
the HeteGen row split applied to an expert. Elsewhere (prefill) the two add up where the
expert is computed; prefill streaming copies both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetegen_cli.core.errors import ModelError, PlanError
from hetegen_cli.engine.quant_host import DequantLinear, StoredLinear, dequantize
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant_experts import (
    CpuExpert,
    StoredPart,
    copy_float_expert,
    expert_jobs,
    fused_experts,
    read_stored_expert,
    split_expert,
)
from hetegen_cli.models.shapes.experts import PARTS, ExpertsSpec, quant_expert_key
from hetegen_cli.plan.document import ExpertsPlacement


class HeteroExperts(nn.Module):
    """One MoE layer's routed experts, split by expert between the GPU side and the CPU.

    GPU-side weights are non-persistent buffers (counted as device memory); the CPU's are plain
    attributes in host RAM (not parameters: they must not follow `.to()`)."""

    def __init__(
        self, placement: ExpertsPlacement, spec: ExpertsSpec, act_fn: nn.Module, context: Any
    ) -> None:
        super().__init__()
        self.placement = placement
        self.num_experts = spec.num_experts
        self.width = spec.intermediate_size
        self.act_fn = act_fn
        self.context = context
        #: expert -> (on the GPU side, its slot in that side's tensors)
        self.home = {e: (True, j) for j, e in enumerate(placement.gpu)}
        self.home |= {e: (False, j) for j, e in enumerate(placement.cpu)}
        #: quantized experts: the GPU side's DeviceExperts, the CPU's CpuExperts (install_experts)
        self.quantized = bool(spec.part_quant)
        self.gpu_experts = nn.ModuleList()
        #: the CPU side's experts (their units from `split` on when split), and when split
        #: their first `split` units (install_experts)
        self.cpu_experts: list[CpuExpert] = []
        self.cpu_firsts: list[CpuExpert] = []
        self.cpu_fused: Any = None  # their fused.GatedFFN, False where there is none (install_experts)
        #: quantized streaming: (format, group, tensors) of each part, each CPU expert's pieces'
        #: host tensors in that order (install_experts), the pinned blocks they live in on a GPU
        self.stream_layout: list[tuple[str | None, int | None, int]] = []
        self.stored: list[tuple[tuple[torch.Tensor | None, ...], ...]] = []
        self.pinned: list[torch.Tensor] = []
        #: per CPU expert, per piece: the pinned block its stored tensors all lie in (one copy
        #: moves the piece), or None
        self.blocks: list[tuple[torch.Tensor | None, ...]] = []
        self.closed = False
        h, i = spec.hidden_size, spec.intermediate_size
        device, wdt = context.backend.device, context.weights_dtype
        n_gpu, n_cpu = (0, 0) if self.quantized else (len(placement.gpu), len(placement.cpu))
        self.register_buffer("gpu_gate_up", torch.empty((n_gpu, 2 * i, h), dtype=wdt, device=device), False)
        self.register_buffer("gpu_down", torch.empty((n_gpu, h, i), dtype=wdt, device=device), False)
        cdt = context.cpu_dtypes[1]  # the decode format serves both phases (plan.memory.experts_bytes)
        #: in prefill the CPU side's experts go to the GPU (pinned, for asynchronous copies);
        #: quantized ones only if held as stored (install_experts decides)
        self.streams = placement.stream_prefill and bool(placement.cpu)
        #: intermediate units of each CPU-side expert held apart (0: none), and whether decode
        #: computes them on the GPU (quantized: only if held as stored; install_experts)
        self.split = checked_split(placement, spec) if placement.cpu else 0
        self.splits = bool(self.split)
        backend = context.backend
        k = self.split

        def held(shape: tuple[int, ...], streamed: bool) -> torch.Tensor:
            if streamed and not self.quantized and backend.is_cuda:
                with torch.inference_mode(False):
                    return backend.empty_pinned(shape, cdt)
            return torch.empty(shape, dtype=cdt)

        self.cpu_gate_up: torch.Tensor | None = held((n_cpu, 2 * (i - k), h), self.streams)
        self.cpu_down: torch.Tensor | None = held((n_cpu, h, i - k), self.streams)
        self.cpu_gate_up_first: torch.Tensor | None = held((n_cpu if k else 0, 2 * k, h), True)
        self.cpu_down_first: torch.Tensor | None = held((n_cpu if k else 0, h, k), True)

    @property
    def host_bytes(self) -> int:
        tensors = (self.cpu_gate_up, self.cpu_down, self.cpu_gate_up_first, self.cpu_down_first)
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + sum(x.nbytes for x in [*self.cpu_experts, *self.cpu_firsts])

    def release(self) -> None:
        """Drop the host-held experts (the engine closes)."""
        self.cpu_gate_up = self.cpu_down = self.cpu_gate_up_first = self.cpu_down_first = None
        self.cpu_experts, self.cpu_firsts, self.stored, self.blocks = [], [], [], []
        for arena in self.pinned:
            self.context.backend.release_arena(arena)
        self.pinned = []
        self.closed = True

    def host_pieces(self, j: int) -> tuple[tuple[torch.Tensor | None, ...], ...]:
        """CPU-side expert j's host tensors as streaming copies them: one piece, or when split
        its first units then the rest."""
        if self.quantized:
            return self.stored[j]
        rest = (self.cpu_gate_up[j], self.cpu_down[j])
        return ((self.cpu_gate_up_first[j], self.cpu_down_first[j]), rest) if self.split else (rest,)

    @property
    def stream_bytes(self) -> int:
        """Staging bytes the largest piece it streams takes (ExpertStream: aligned tensors):
        every piece of an expert in prefill streaming, the first units in a decode split."""
        pieces = self.host_pieces(0)
        return max(_laid_bytes(p) for p in (pieces if self.streams else pieces[:1]))

    def extra_repr(self) -> str:
        stored = f", quantized={self.placement.name}" if self.quantized else ""
        split = f", split_units={self.split}" if self.split else ""
        return f"experts={self.num_experts}, gpu={list(self.placement.gpu)}{stored}{split}"

    def _compute(self, on_gpu: bool, j: int, x: torch.Tensor, whole: bool = True) -> torch.Tensor:
        """Expert j of one side on its tokens `x`; a split CPU-side expert without its first
        units unless `whole`."""
        if on_gpu:
            if self.quantized:
                return self.gpu_experts[j](x)
            return _expert(x, self.gpu_gate_up[j], self.gpu_down[j], self.act_fn)
        if self.quantized:
            y = self.cpu_experts[j](x)
            return y + self.cpu_firsts[j](x) if whole and self.split else y
        x = x.to(self.cpu_gate_up.dtype)
        y = _expert(x, self.cpu_gate_up[j], self.cpu_down[j], self.act_fn)
        if whole and self.split:
            y = y + _expert(x, self.cpu_gate_up_first[j], self.cpu_down_first[j], self.act_fn)
        return y

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.closed:
            raise ModelError("the engine of this model was closed", "load the model again")
        ctx, backend = self.context, self.context.backend
        out = torch.zeros_like(hidden_states)
        jobs = expert_jobs(top_k_index, self.num_experts)
        tr = ctx.tracer  # one "experts" op a forward (engine.trace): its work is priced by the plan
        if self.streams and ctx.phase == "prefill":
            self._on_gpu(hidden_states, top_k_weights, jobs, out, all_pieces=True)
            if tr is not None:
                tr.op("experts", experts=self.placement.name, tokens=hidden_states.shape[0])
            return out
        split = self.splits and ctx.phase == "decode"
        gpu_jobs = [job for job in jobs if self.home[job[0]][0]]
        cpu_jobs = [job for job in jobs if not self.home[job[0]][0]]
        staged = self._to_host(hidden_states, top_k_weights) if cpu_jobs and backend.is_cuda else None
        # queued on the GPU (with a split, the CPU experts' first units too, streamed); they
        # run while the CPU works below
        self._on_gpu(hidden_states, top_k_weights, jobs if split else gpu_jobs, out, all_pieces=False)
        if not cpu_jobs:
            if tr is not None:
                tr.op("experts", experts=self.placement.name, tokens=hidden_states.shape[0])
            return out
        start = time.perf_counter()
        if staged is None:  # the CPU stand-in: the hidden states live on the host already
            x_h, w_h = hidden_states, top_k_weights
        else:
            x_h, w_h, ready = staged
            ready.synchronize()  # the copy to the host has landed
        y_h = self._cpu_experts(x_h, w_h, cpu_jobs, out.dtype, whole=not split)
        ctx.stats.experts_cpu += len(cpu_jobs)
        ctx.stats.experts_cpu_s += time.perf_counter() - start
        if tr is not None:  # the host's own work up to here; its wait and the CPU side are priced
            tr.blocking("experts", start, experts=self.placement.name, tokens=hidden_states.shape[0])
        if staged is None:
            return out + y_h
        y = torch.empty_like(out)
        backend.to_device_async(y, y_h)  # y_h is fresh for this call: never rewritten
        return out + y

    def _on_gpu(
        self, hidden: torch.Tensor, weights: torch.Tensor, jobs: list, out: torch.Tensor, all_pieces: bool
    ) -> None:
        """`jobs` computed on the GPU, added into `out` in order: the GPU side's experts from
        their own buffers; a CPU-side expert's pieces (`all_pieces`: every one, prefill
        streaming; else its first units, a decode split) through the context's ExpertStream,
        each next copy issued before the current matmul."""
        items = []  # (GPU-side slot or None, (host tensors, their block) to stream or None, pos, tok)
        for (e, _, _), (pos, tok) in zip(jobs, self._to_device(jobs), strict=True):
            on_gpu, j = self.home[e]
            if on_gpu:
                items.append((j, None, pos, tok))
            else:
                tensors = self.host_pieces(j)
                blocks = self.blocks[j] if self.blocks else (None,) * len(tensors)
                pieces = list(zip(tensors, blocks, strict=True))
                items += [(None, p, pos, tok) for p in (pieces if all_pieces else pieces[:1])]
        loads = [piece for _, piece, _, _ in items if piece is not None]
        stream: ExpertStream = self.context.expert_stream
        if loads:
            stream.load(*loads[0])
        k = 0  # pieces done
        for j, tensors, pos, tok in items:
            x = hidden[tok]
            if tensors is None:
                y = self._compute(True, j, x)
            else:
                if k + 1 < len(loads):  # the next one's copy runs while this one computes
                    stream.load(*loads[k + 1])
                y = self._staged(x, stream.take(), self.context.weights_dtype)
                stream.release()
                k += 1
            out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
        stats = self.context.stats
        streamed = sum(not self.home[e][0] for e, _, _ in jobs)
        stats.experts_gpu += len(jobs) - streamed
        if all_pieces:
            stats.experts_streamed += streamed
        else:
            stats.experts_split += streamed

    def _staged(
        self, x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], wdt: torch.dtype
    ) -> torch.Tensor:
        """A streamed expert on the GPU from the slot's tensors (host_parts' order): float
        weights in `wdt`; quantized parts dequantized into `wdt` one at a time."""
        if not self.quantized:
            gate_up, down = tensors
            return _expert(x, gate_up.to(wdt), down.to(wdt), self.act_fn)
        it = iter(tensors)
        parts = [(fmt, group, tuple(next(it) for _ in range(n))) for fmt, group, n in self.stream_layout]
        gate = F.linear(x, _weight(parts[0], wdt))  # each weight freed after its matmul
        up = F.linear(x, _weight(parts[1], wdt))
        return F.linear(self.act_fn(gate) * up, _weight(parts[2], wdt))

    def _to_host(self, hidden: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Pinned host copies of the hidden states and routing weights, on the compute stream
        before the GPU experts' kernels, and the event after them."""
        backend = self.context.backend
        with torch.inference_mode(False):
            x_h = backend.empty_pinned(tuple(hidden.shape), hidden.dtype)
            w_h = backend.empty_pinned(tuple(weights.shape), weights.dtype)
        backend.to_host_async(x_h, hidden)
        backend.to_host_async(w_h, weights)
        return x_h, w_h, backend.record_event()

    def _to_device(self, jobs: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(top-k positions, tokens) of each GPU job on the device: one copy for them all, on
        the compute stream before the kernels that read it."""
        backend = self.context.backend
        if not backend.is_cuda or not jobs:
            return [(pos, tok) for _, pos, tok in jobs]
        host = torch.cat([torch.stack((pos, tok)) for _, pos, tok in jobs], dim=1)  # [2, sum]
        with torch.inference_mode(False):
            pinned = backend.empty_pinned(tuple(host.shape), host.dtype)
        pinned.copy_(host)
        dev = torch.empty(host.shape, dtype=host.dtype, device=backend.device)
        backend.to_device_async(dev, pinned)  # pinned is fresh for this call: never rewritten
        sizes = [len(tok) for _, _, tok in jobs]
        return list(zip(dev[0].split(sizes), dev[1].split(sizes), strict=True))

    def _cpu_experts(
        self, x_h: torch.Tensor, w_h: torch.Tensor, jobs: list, out_dtype: torch.dtype, whole: bool
    ) -> torch.Tensor:
        """The CPU experts' weighted sum [T, H] on the host (pinned on a GPU machine); split
        experts without their first units unless `whole`."""
        backend = self.context.backend
        if backend.is_cuda:
            with torch.inference_mode(False):
                y_h = backend.empty_pinned(tuple(x_h.shape), out_dtype)
            y_h.zero_()
        else:
            y_h = torch.zeros(x_h.shape, dtype=out_dtype)
        one_token = x_h.shape[0] == 1 and x_h.dtype is torch.float32 and out_dtype is torch.float32
        # one kernel call for the token's CPU experts (models.formats.fused), which hold a
        # split expert's other units only
        if self.cpu_fused and one_token and not (whole and self.split):
            weights = w_h[0].tolist()
            sel = [self.home[e][1] for e, _, _ in jobs]
            self.cpu_fused.add(x_h.contiguous(), sel, [weights[int(pos[0])] for _, pos, _ in jobs], y_h)
            return y_h
        for e, pos, tok in jobs:
            y = self._compute(False, self.home[e][1], x_h[tok], whole)
            y = y * w_h[tok, pos, None]
            y_h.index_add_(0, tok, y.to(out_dtype))
        return y_h


class ExpertStream:
    """Two staging slots on the device that prefill streaming copies CPU-side experts into, on
    a side stream (plan.memory: the plan's `expert_staging_bytes`), each `capacity` bytes that
    an expert's tensors are laid into, 64-byte aligned. Copies and computations alternate
    between the slots in order: `load` issues the next copy, `take` waits for the oldest one,
    `release` marks its slot free once the computation reading it is queued."""

    def __init__(self, backend: Any, capacity: int) -> None:
        self.backend = backend
        self.copy_stream = backend.new_stream()
        self.slots = [torch.empty(capacity, dtype=torch.uint8, device=backend.device) for _ in range(2)]
        self.views: list[tuple[torch.Tensor | None, ...]] = [(), ()]
        self.ready: list[Any] = [None, None]
        self.free: list[Any] = [None, None]
        self.loaded = self.taken = 0  # copies issued, copies taken (slot = count % 2)

    @property
    def nbytes(self) -> int:
        return sum(slot.numel() for slot in self.slots)

    def load(self, tensors: Sequence[torch.Tensor | None], block: torch.Tensor | None = None) -> None:
        """Issue the copy of one expert's host tensors (pinned on a GPU machine; None kept as
        None) into the next slot: one copy of `block` when they all lie in that uint8 host
        block (their views at the same offsets in the slot), else one copy each."""
        if self.loaded - self.taken >= 2:
            raise RuntimeError("both staging slots are loaded: take one first")
        s = self.loaded % 2
        if self.free[s] is not None:  # the last computation that read this slot
            self.backend.wait_event(self.free[s], self.copy_stream)
        if block is not None:
            room = self.slots[s].numel()
            if block.numel() > room:
                raise RuntimeError(f"a {block.numel()}-byte block does not fit a {room}-byte slot")
            dst = self.slots[s][: block.numel()]
            self.views[s] = tuple(None if t is None else _at_offset(dst, t, block) for t in tensors)
            self.backend.to_device_async(dst, block, self.copy_stream)
        else:
            self.views[s] = _laid_out(self.slots[s], tensors)
            for dst, t in zip(self.views[s], tensors, strict=True):
                if t is not None:
                    self.backend.to_device_async(dst, t, self.copy_stream)
        self.ready[s] = self.backend.record_event(self.copy_stream, self.ready[s])
        self.loaded += 1

    def take(self) -> tuple[torch.Tensor | None, ...]:
        """The oldest loaded slot's tensors, once its copy has landed (the compute stream
        waits)."""
        s = self.taken % 2
        self.backend.wait_event(self.ready[s])
        return self.views[s]

    def release(self) -> None:
        """The computation reading the taken slot is queued: the slot is free after it."""
        s = self.taken % 2
        self.free[s] = self.backend.record_event(None, self.free[s])
        self.taken += 1


def _weight(part: StoredPart, dtype: torch.dtype) -> torch.Tensor:
    """One staged part's weight [out, in] in `dtype`, dequantized on its device if quantized
    (engine.quant_host.dequantize; a symmetric int4 part's min is -8 times its scale)."""
    fmt, group, tensors = part
    if fmt is None:
        return tensors[0].to(dtype)
    if fmt == "int4" and tensors[2] is None:
        tensors = (tensors[0], tensors[1], tensors[1] * -8)
    return dequantize(fmt, group, tensors, dtype)


def _aligned(nbytes: int) -> int:
    """Bytes a tensor takes in a block of several: every tensor starts 64-byte aligned."""
    return -(-nbytes // 64) * 64


def _laid_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    """Bytes of a uint8 block that `tensors` are laid into by `_laid_out`."""
    return sum(_aligned(t.numel() * t.element_size()) for t in tensors if t is not None)


def _laid_out(block: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, ...]:
    """Views of the uint8 `block` shaped and typed as `tensors`, one after another, each
    64-byte aligned (None stays None); nothing is copied."""
    views, at = [], 0
    for t in tensors:
        if t is None:
            views.append(None)
            continue
        n = t.numel() * t.element_size()
        views.append(block[at : at + n].view(t.dtype).view(t.shape))
        at += _aligned(n)
    return tuple(views)


def _at_offset(dst: torch.Tensor, t: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The view of uint8 `dst` that holds what contiguous `t` holds in the host `block`."""
    at, n = t.data_ptr() - block.data_ptr(), t.numel() * t.element_size()
    return dst[at : at + n].view(t.dtype).view(t.shape)


def _within(t: torch.Tensor | None, block: torch.Tensor) -> bool:
    """Whether `t` (None: nothing) is contiguous and lies in the uint8 `block`."""
    if t is None:
        return True
    at = t.data_ptr() - block.data_ptr()
    return t.is_contiguous() and 0 <= at <= block.numel() - t.numel() * t.element_size()


def _expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """One expert on its tokens, as transformers computes it."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act_fn(gate) * up, down)


class DeviceExpert(nn.Module):
    """One quantized routed expert on the GPU side: each part as stored, on the device (a
    DequantLinear; a floating-point part as an nn.Linear in the weights dtype), dequantized one
    part at a time into the weights dtype before its matmul (plan.memory.dequant_bytes)."""

    def __init__(self, parts: dict[str, nn.Module], act_fn: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = parts["gate"], parts["up"], parts["down"]
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act_fn(self.gate(x)) * self.up(x))


def _device_expert(reader: CheckpointReader, spec: ExpertsSpec, e: int, context: Any, act_fn) -> DeviceExpert:
    device, wdt = context.backend.device, context.weights_dtype
    parts: dict[str, nn.Module] = {}
    for part in PARTS:
        key = quant_expert_key(spec.name, e, part)
        shape, q = spec.part_shape(part), spec.part_format(part)
        if q is not None:
            parts[part] = DequantLinear.load(
                StoredLinear(reader, key.removesuffix(".weight"), shape, q), device, None
            )
        else:
            linear = nn.Linear(shape[1], shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(reader.read(key, wdt, device), requires_grad=False)
            parts[part] = linear
    return DeviceExpert(parts, act_fn)


def _pin(expert: CpuExpert, backend: Any) -> torch.Tensor:
    """Move a CPU expert's kernel buffers into one page-locked block (so that prefill streaming
    copies them asynchronously) and return the block, which they are views of."""
    kernels = [op for op in expert.operands() if isinstance(op, nn.Module)]  # float parts stay pageable
    buffers = [(op, name, b) for op in kernels for name, b in op._buffers.items() if b is not None]
    arena = backend.pinned_arena(_laid_bytes([b for _, _, b in buffers]))
    for (op, name, b), view in zip(buffers, _laid_out(arena, [b for _, _, b in buffers]), strict=True):
        view.copy_(b)
        op._buffers[name] = view
    return arena


def checked_split(placement: ExpertsPlacement, spec: ExpertsSpec) -> int:
    """The placement's split_units; PlanError unless it splits the layer's experts."""
    k, i, step = placement.split_units, spec.intermediate_size, spec.split_step
    if k and (k >= i or k % step):
        raise PlanError(
            f"the plan splits the experts {placement.name} at {k} of their {i} intermediate "
            f"units, not a multiple of {step} below {i}",
            "re-run `hetegen plan` for this model, or set split_units to 0",
        )
    return k


def install_experts(
    model: nn.Module, placement: ExpertsPlacement, spec: ExpertsSpec, reader: CheckpointReader, context: Any
) -> HeteroExperts:
    """Read one layer's experts into their homes and swap the module for a HeteroExperts."""
    original = model.get_submodule(placement.name)
    experts = HeteroExperts(placement, spec, original.act_fn, context)
    k, i = experts.split, spec.intermediate_size
    for e in range(spec.num_experts):
        on_gpu, j = experts.home[e]
        if experts.quantized:
            if on_gpu:
                experts.gpu_experts.append(_device_expert(reader, spec, e, context, original.act_fn))
                continue
            parts = read_stored_expert(reader, spec, e, context.cpu_dtypes[1])
            if k:
                first, parts = split_expert(parts, k)
                experts.cpu_firsts.append(CpuExpert(first, original.act_fn))
            experts.cpu_experts.append(CpuExpert(parts, original.act_fn))
        elif on_gpu:
            copy_float_expert(reader, spec, e, experts.gpu_gate_up[j], experts.gpu_down[j])
        elif not k:
            copy_float_expert(reader, spec, e, experts.cpu_gate_up[j], experts.cpu_down[j])
        else:  # gate and up rows, down columns: the first k units, then the rest
            gate_up = torch.empty((2 * i, spec.hidden_size), dtype=experts.cpu_gate_up.dtype)
            down = torch.empty((spec.hidden_size, i), dtype=gate_up.dtype)
            copy_float_expert(reader, spec, e, gate_up, down)
            gate, up = gate_up[:i], gate_up[i:]
            torch.cat((gate[:k], up[:k]), out=experts.cpu_gate_up_first[j])
            torch.cat((gate[k:], up[k:]), out=experts.cpu_gate_up[j])
            experts.cpu_down_first[j].copy_(down[:, :k])
            experts.cpu_down[j].copy_(down[:, k:])
    if experts.quantized and (experts.streams or experts.splits):
        _hold_stored(experts, context.backend)
    if experts.quantized and experts.cpu_experts:
        experts.cpu_fused = fused_experts(experts.cpu_experts) or False
    owner, _, attr = placement.name.rpartition(".")
    setattr(model.get_submodule(owner), attr, experts)
    return experts


def _hold_stored(experts: HeteroExperts, backend: Any) -> None:
    """A quantized layer that streams: each CPU-side expert's pieces as stored (experts.stored),
    pinned on a GPU (the pieces it streams: every one in prefill streaming, else the first
    units); a layer whose experts sit in torch's packed layout has none and neither streams in
    prefill nor splits in decode."""
    firsts = experts.cpu_firsts or [None] * len(experts.cpu_experts)
    pieces = [(x,) if f is None else (f, x) for f, x in zip(firsts, experts.cpu_experts, strict=True)]
    stored = [[x.stored_parts() for x in expert] for expert in pieces]
    if any(None in expert for expert in stored):
        experts.streams = experts.splits = False
        return
    experts.stream_layout = [(fmt, group, len(tensors)) for fmt, group, tensors in stored[0][0]]
    blocks = [[None] * len(expert) for expert in pieces]
    if backend.is_cuda:  # before fusing: the fused kernel reads their addresses
        streamed = len(pieces[0]) if experts.streams else 1
        for expert, held in zip(pieces, blocks, strict=True):
            held[:streamed] = [_pin(x, backend) for x in expert[:streamed]]
        experts.pinned = [b for held in blocks for b in held if b is not None]
        stored = [[x.stored_parts() for x in expert] for expert in pieces]  # views of the pinned blocks
    experts.stored = [
        tuple(tuple(t for _, _, tensors in parts for t in tensors) for parts in expert) for expert in stored
    ]
    experts.blocks = [  # a piece with float parts (outside its block) is copied tensor by tensor
        tuple(
            b if b is not None and all(_within(t, b) for t in ts) else None
            for ts, b in zip(expert, held, strict=True)
        )
        for expert, held in zip(experts.stored, blocks, strict=True)
    ]
