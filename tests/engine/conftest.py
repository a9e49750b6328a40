"""Engine test helpers: placement patterns and the tiny models with transformers' own greedy
tokens as the reference."""

from __future__ import annotations

import random

import pytest
import torch

from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import ExpertsPlacement, LinearPlacement, round_rows

PROMPT = [[5, 17, 42, 99, 7, 250]]
NEW_TOKENS = 8


def placements(spec, choose) -> list[LinearPlacement]:
    """One placement per block linear.

    choose(linear, index) -> (resident, cpu_rows_prefill, cpu_rows_decode)."""
    out = []
    for i, lin in enumerate(spec.linears):
        resident, pre, dec = choose(lin, i)
        out.append(
            LinearPlacement(
                lin.name, lin.layer_index, lin.role, lin.out_features, lin.in_features, resident, pre, dec
            )
        )
    return out


def random_rows(seed: int):
    rng = random.Random(seed)

    def choose(lin, i):
        return False, round_rows(rng.random(), lin.out_features), round_rows(rng.random(), lin.out_features)

    return choose


PLANS = {
    "all_cpu": lambda lin, i: (False, lin.out_features, lin.out_features),
    "all_streamed": lambda lin, i: (False, 0, 0),
    "random": random_rows(7),
    # every third linear resident; the others split, prefill CPU share ~0, decode ~0.6
    "mixed": lambda lin, i: (
        (True, 0, 0)
        if i % 3 == 0
        else (False, round_rows(0.1 * (i % 2), lin.out_features), round_rows(0.6, lin.out_features))
    ),
}


#: which routed experts of a MoE layer a plan of that name puts on the GPU side
EXPERTS = {
    "all_cpu": lambda x: (),
    "all_streamed": lambda x: range(x.num_experts),  # the GPU-heavy plan: every expert
    "random": lambda x: sorted(random.Random(x.layer_index).sample(range(x.num_experts), x.num_experts // 2)),
    "mixed": lambda x: range(0, x.num_experts, 2),  # every other expert
}


def expert_placements(spec, choose) -> list[ExpertsPlacement]:
    """One experts placement per MoE layer of `spec`; choose(experts spec) -> GPU-side experts."""
    return [ExpertsPlacement.of(x, choose(x)) for x in spec.experts]


@pytest.fixture(scope="module")
def models(tiny_opt_dir, tiny_llama_dir):
    """name -> (ModelRef, reference greedy tokens, reference prompt logits) in fp32."""
    from transformers import AutoModelForCausalLM

    result = {}
    for name, folder in (("opt", tiny_opt_dir), ("llama", tiny_llama_dir)):
        ref = resolve_model(str(folder), need_weights=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            logits = model(ids).logits
        result[name] = (ref, tokens, logits)
    return result
