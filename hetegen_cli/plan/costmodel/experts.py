"""The routed experts of mixture-of-experts layers in the cost model (pure Python; docs/plan.md,
"Experts").

Use is uniform until expert statistics exist: each of a step's n tokens picks top_k of the E
experts, so a step activates D(n) = E (1 - (1 - k/E)^n) distinct experts per layer
(models.shapes.experts.expected_distinct), each seeing n k / D(n) tokens on average. An expert
on the GPU side is computed there; any other one by the CPU from host RAM, whole (its three
matrices), only when active. The two sides of a layer run at once (engine.experts), so the
layer takes the longer of the two.
"""

from __future__ import annotations

from collections.abc import Iterable

from hetegen_cli.models.shapes.experts import ExpertsSpec, expected_distinct
from hetegen_cli.plan.costmodel import hardware as cm
from hetegen_cli.plan.document import ExpertsPlacement


def step_tokens(req, phase: str) -> int:
    """Tokens one step routes: the prompt in prefill, one per sequence in decode."""
    return req.batch_size * (req.prompt_len if phase == "prefill" else 1)


def expert_s(rates: cm.Rates, x: ExpertsSpec, tokens: float, on_gpu: bool, concurrent: bool = True) -> float:
    """Seconds of one active expert (gate and up [2I, H], down [H, I]) on `tokens` tokens."""
    n = max(1, round(tokens))
    if on_gpu:
        return cm.gpu_time(rates, 2 * x.intermediate_size, x.hidden_size, n) + cm.gpu_time(
            rates, x.hidden_size, x.intermediate_size, n
        )
    return cm.cpu_time(rates, 2 * x.intermediate_size, x.hidden_size, n, concurrent) + cm.cpu_time(
        rates, x.hidden_size, x.intermediate_size, n, concurrent
    )


def layer_s(
    rates: cm.Rates, x: ExpertsSpec, gpu_experts: int, tokens: int, concurrent: bool = True
) -> tuple[float, float]:
    """(CPU side, GPU side) seconds of one layer's experts in a step of `tokens` tokens with
    `gpu_experts` of them on the GPU side (uniform use)."""
    active = expected_distinct(x.num_experts, x.top_k, tokens)
    if active <= 0:
        return 0.0, 0.0
    per_expert = tokens * x.top_k / active
    share_gpu = gpu_experts / x.num_experts
    gpu = active * share_gpu * expert_s(rates, x, per_expert, True) if gpu_experts else 0.0
    cpu = active * (1 - share_gpu) * expert_s(rates, x, per_expert, False, concurrent)
    return cpu, gpu


def experts_step_s(
    rates: cm.Rates,
    specs: Iterable[ExpertsSpec],
    placements: Iterable[ExpertsPlacement] | None,
    tokens: int,
    concurrent: bool = True,
    gpu_layers: int | None = None,
) -> float:
    """Seconds of every MoE layer's experts in one step: each layer the longer of its two
    sides. `placements` None: every expert on the CPU, or with `gpu_layers` every expert of the
    layers below it on the GPU (a layer split)."""
    on_gpu = {p.name: len(p.gpu) for p in placements or ()}
    total = 0.0
    for x in specs:
        if gpu_layers is not None:
            n_gpu = x.num_experts if x.layer_index < gpu_layers else 0
        else:
            n_gpu = on_gpu.get(x.name, 0)
        total += max(layer_s(rates, x, n_gpu, tokens, concurrent))
    return total


def active_bytes(
    specs: Iterable[ExpertsSpec], placements: Iterable[ExpertsPlacement], tokens: int
) -> tuple[float, float]:
    """(GPU, host) bytes of the experts one step of `tokens` tokens reads (uniform use)."""
    on_gpu = {p.name: len(p.gpu) for p in placements}
    gpu = host = 0.0
    for x in specs:
        active = expected_distinct(x.num_experts, x.top_k, tokens) * x.expert_bytes
        share = on_gpu.get(x.name, 0) / x.num_experts
        gpu += active * share
        host += active * (1 - share)
    return gpu, host


def expert_priority(rates: cm.Rates, x: ExpertsSpec, batch: int) -> float:
    """Decode seconds saved per byte of GPU memory by holding one expert of `x` on the GPU
    side (uniform use: the chance it is active in a step times its CPU time less its GPU time)."""
    active = expected_distinct(x.num_experts, x.top_k, batch)
    tokens = batch * x.top_k / active if active else 1
    p_active = active / x.num_experts
    saved = expert_s(rates, x, tokens, False) - expert_s(rates, x, tokens, True)
    return max(0.0, p_active * saved) / x.expert_bytes
