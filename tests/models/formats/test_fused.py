"""The decode fusions (models.formats.fused): a gated MLP, a MoE layer's chosen experts and an
RMS norm in one kernel call each, against the modules' own forwards; modules that do not
match keep theirs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from hetegen_cli.models.formats import cpu_kernels, fused
from hetegen_cli.models.formats.quant import QuantLinear, quantize
from hetegen_cli.models.formats.quant_experts import CpuExpert, QuantExperts, fused_experts

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="hetegen's CPU kernels are unavailable")

HIDDEN, INTER = 64, 96


def quantized_mlp(fmt: str, act: str = "silu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=INTER, hidden_act=act)
    mlp = LlamaMLP(config).eval()
    for name in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(mlp, name)
        setattr(mlp, name, QuantLinear(quantize(linear.weight.detach(), fmt, 32)))
    return mlp


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= rtol * want.abs().max().item(), err


def fuses_to_its_own_result(module: nn.Module, x: torch.Tensor, expected: fused.Fusions) -> None:
    """fuse_model reports `expected`, and the fused module answers x as it did before."""
    want = module.forward(x)
    assert fused.fuse_model(module) == expected
    close(module(x), want)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_gated_mlp_is_one_call_with_its_own_result(fmt):
    mlp = quantized_mlp(fmt)
    own = mlp.forward
    x = torch.randn(1, 1, HIDDEN)
    want = own(x)
    assert fused.fuse_model(mlp) == fused.Fusions(mlps=1)
    assert mlp.forward is not own
    close(mlp(x), want)
    several = torch.randn(1, 3, HIDDEN)  # prefill: transformers' forward, bit for bit
    assert torch.equal(mlp(several), own(several))
    half = x.to(torch.bfloat16)  # another dtype: its own forward
    assert torch.equal(mlp(half), own(half))


def test_a_mlp_with_another_activation_keeps_its_forward():
    mlp = quantized_mlp("int4", act="gelu_pytorch_tanh")
    own = mlp.forward
    assert fused.fuse_model(mlp) == fused.Fusions()
    assert mlp.forward == own


def test_a_mlp_computing_something_else_is_rejected():
    class Doubled(LlamaMLP):
        def forward(self, x):
            return 2 * super().forward(x)

    mlp = quantized_mlp("int4")
    mlp.__class__ = Doubled
    assert fused.fuse_model(mlp) == fused.Fusions(rejected=1)
    assert "forward" not in vars(mlp)


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, GemmaRMSNorm])
def test_rms_norms_take_their_own_weight_form(norm_class):
    """LLaMA's w * x_hat and Gemma's (1 + w) * x_hat, any number of rows."""
    norm = norm_class(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(HIDDEN))
    fuses_to_its_own_result(norm, torch.randn(2, 5, HIDDEN), fused.Fusions(norms=1))


def test_a_norm_named_so_but_computing_otherwise_is_left_alone():
    class OddRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(HIDDEN))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * self.weight  # no normalization

    norm = OddRMSNorm()
    assert fused.fuse_model(norm) == fused.Fusions()
    assert "forward" not in vars(norm)


def test_unfused_keeps_every_forward():
    mlp = quantized_mlp("int4")
    with fused.unfused():
        assert fused.fuse_model(mlp) == fused.Fusions()
    assert "forward" not in vars(mlp)


def experts(
    fmt: str, n: int = 4, hidden: int = HIDDEN, inter: int = INTER, down_fmt: str | None = None
) -> list[CpuExpert]:
    gen = torch.Generator().manual_seed(1)
    act = nn.SiLU()
    out = []
    for _ in range(n):
        parts = {
            "gate": quantize(torch.randn(inter, hidden, generator=gen) * 0.1, fmt, 32),
            "up": quantize(torch.randn(inter, hidden, generator=gen) * 0.1, fmt, 32),
            "down": quantize(torch.randn(hidden, inter, generator=gen) * 0.1, down_fmt or fmt, 32),
        }
        out.append(CpuExpert(parts, act))
    return out


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_chosen_experts_in_one_call_weigh_and_add_as_transformers(fmt):
    """Experts chosen out of order, one of them the padding id E (not an expert): the fused
    sum equals the expert-by-expert one."""
    cpu = experts(fmt)
    spec = type("Spec", (), {"num_experts": len(cpu), "quant_label": fmt})()
    layer = QuantExperts(spec, cpu)
    assert layer.fused is not None
    x = torch.randn(1, HIDDEN)
    index = torch.tensor([[3, 4, 1]])  # 4 == E: skipped
    weights = torch.tensor([[0.25, 0.5, 0.7]])
    got = layer(x, index, weights)
    want = 0.7 * cpu[1](x) + 0.25 * cpu[3](x)
    close(got, want)
    assert fused.fuse_model(layer).experts == 1
    layer.fused = None  # the expert-by-expert path
    close(got, layer(x, index, weights))


@pytest.mark.parametrize(("fmt", "down_fmt"), [("int4", "int4"), ("int8", "int4"), ("int4", "int8")])
def test_experts_split_over_threads_anywhere_give_one_answer(fmt, down_fmt):
    """Big enough for a team of threads (the kernel splits all the experts' rows together, so
    a thread's share starts inside an expert): the same sum at 1, 2 and 3 threads, bit for bit,
    and the expert-by-expert one, with the formats mixed as GGUF files mix them."""
    cpu = experts(fmt, 6, hidden=256, inter=160, down_fmt=down_fmt)
    spec = type("Spec", (), {"num_experts": len(cpu), "quant_label": fmt})()
    layer = QuantExperts(spec, cpu)
    assert layer.fused is not None
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([[5, 0, 3, 2, 4]])
    weights = torch.tensor([[0.1, 0.3, 0.2, 0.15, 0.25]])
    threads = torch.get_num_threads()
    try:
        answers = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            answers.append(layer(x, index, weights))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(answers[0], answers[1]) and torch.equal(answers[0], answers[2])
    want = sum(w * cpu[e](x) for e, w in zip(index[0].tolist(), weights[0].tolist(), strict=True))
    close(answers[0], want)


def test_experts_with_a_float_part_are_not_fused():
    cpu = experts("int4", 2)
    cpu[1].down = nn.Identity()  # not a QuantLinear: no description
    assert fused_experts(cpu) is None


def test_a_symmetric_int4_mlp_fuses_without_mins():
    """GGUF Q4_0's int4 (min = -8 scale) is held without mins; the fused call reads none."""
    mlp = quantized_mlp("int4")
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(mlp, name)
        stored = w.q, w._buffers["scales"].view(torch.float16)
        weight = quantize(torch.zeros(w.out_features, w.in_features), "int4", 32)
        weight.q.copy_(stored[0])
        weight.scale.copy_(stored[1])
        weight.min.copy_(-8.0 * stored[1])
        setattr(mlp, name, QuantLinear(weight))
        assert "mins" not in getattr(mlp, name)._buffers
    fuses_to_its_own_result(mlp, torch.randn(1, 1, HIDDEN), fused.Fusions(mlps=1))


def test_a_fused_norm_follows_its_weight_to_another_dtype():
    """model.to(bfloat16) converts the norm's weight: the fused forward hands float32 input
    to the module's own forward rather than read the weight as float32."""
    norm = LlamaRMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(HIDDEN))
    assert fused.fuse_model(norm).norms == 1
    norm.to(torch.bfloat16)
    x = torch.randn(1, 2, HIDDEN)
    assert torch.equal(norm(x), LlamaRMSNorm.forward(norm, x))


def test_a_fused_mlp_whose_weights_moved_uses_its_own_forward():
    """_apply (what .to() and friends run) gives the buffers new storage: the described
    addresses are stale, so the module's own forward answers, bit for bit."""
    mlp = quantized_mlp("int4")
    assert fused.fuse_model(mlp).mlps == 1
    mlp._apply(lambda t: t.clone())
    x = torch.randn(1, 1, HIDDEN)
    assert torch.equal(mlp(x), LlamaMLP.forward(mlp, x))


def test_fusing_twice_changes_nothing_the_second_time():
    mlp = quantized_mlp("int8")
    assert fused.fuse_model(mlp).mlps == 1
    first = mlp.forward
    assert fused.fuse_model(mlp) == fused.Fusions()
    assert mlp.forward is first
