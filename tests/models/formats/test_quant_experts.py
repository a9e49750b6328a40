"""Routed experts stored quantized (models.formats.quant_experts, engine.experts): a tiny
random model of each MoE architecture quantized to int8 and int4 (every expert part the
kernels take; weights on the format's grid, so every side holds the same values) runs
through the engine with the plain quantized model's greedy tokens, under an all-CPU plan (bit
for bit: the same packed kernels) and mixed expert placements (every other expert, or a
random half, on the GPU side, dequantized there) on the CPU and strict stand-ins; the plain
model computes the dequantized weights' model (transformers in float32); the engine holds
exactly the bytes the planner counts; a folder missing an expert's part is refused before
loading."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.core.dtypes import greedy_tolerance
from hetegen_cli.core.errors import ModelError, PlanError
from hetegen_cli.core.quant import weight_bytes
from hetegen_cli.engine.hetero_model import engine_context, load_hetero_model
from hetegen_cli.models.architecture.folder import spec_from_folder
from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.quant import QuantWeight, quantize
from hetegen_cli.models.formats.quant_experts import CpuExpert, QuantExperts, read_stored_expert, split_expert
from hetegen_cli.models.formats.quantized import ensure_quantized, read_quant_weight
from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.models.shapes.quantfile import read_quantization
from hetegen_cli.plan.document import RuntimeSettings
from hetegen_cli.plan.memory import experts_bytes, host_memory
from hetegen_cli.run import direct_check
from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
from tests.helpers import ACTIVATIONS, assert_error, cli
from tests.strict import StrictBackend
from tests.tiny_models import VOCAB_SIZE, build_tokenizer, greedy_steps

PROMPT = [[5, 17, 42, 99, 7, 250, 31, 64, 12]]
NEW_TOKENS = 8
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: tiny MoE configs whose expert widths both kernels take (64: int4 groups of 32, int8 16s)
TINY_MOE = {
    "qwen3_moe": dict(_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64),
    "qwen2_moe": dict(
        _COMMON,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
    ),
    "mixtral": dict(_COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_COMMON, intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
}
CASES = [(arch, fmt) for arch in TINY_MOE for fmt in ("int8", "int4")]


def grid_weight(shape: tuple[int, ...], fmt: str, gen: torch.Generator) -> torch.Tensor:
    """Random weights [..., out, in] that `fmt` stores exactly and whose scales torch's packed
    kernels hold exactly (they keep them in bfloat16): int8 rows s q, q in [-127, 127] with a
    +-127 in every row; int4 groups of 32 s (q - 7), q in [0, 15] with a 0 and a 15 in every
    group (min -7 s: asymmetric, so the kernels hold mins as the planner counts them); s a
    power of two (2^-10 .. 2^-8 for int8, 2^-7 .. 2^-5 for int4: standard deviations
    0.04-0.3). The plain
    quantized model, the engine and the dequantized reference then hold the same weights, and
    only their activations' rounding tells them apart."""
    *lead, out, inp = shape
    if fmt == "int8":
        q = torch.randint(-127, 128, shape, generator=gen).float()
        q[..., 0] = 127.0 * torch.where(torch.rand((*lead, out), generator=gen) < 0.5, -1.0, 1.0)
        s = 2.0 ** -torch.randint(8, 11, (*lead, out, 1), generator=gen).float()
        return q * s
    q = torch.randint(0, 16, (*lead, out, inp // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0.0, 15.0
    s = 2.0 ** -torch.randint(5, 8, (*lead, out, inp // 32, 1), generator=gen).float()
    return ((q - 7.0) * s).reshape(shape)


def build_tiny_moe(arch: str, folder, fmt: str | None = None, std: float = 0.1) -> None:
    """A tiny random `arch` model saved as transformers saves it, with the tests' tokenizer:
    matrices ~ N(0, std) (far from uniform routing), or with `fmt` the linears and experts on
    `fmt`'s grid (grid_weight); the router, embeddings and LM head stay normal."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY_MOE[arch]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue
            routed = name.endswith(("proj", ".weight")) and ".gate." not in name and "embed" not in name
            if fmt is not None and routed and "lm_head" not in name and p.shape[-1] % 32 == 0:
                p.copy_(grid_weight(tuple(p.shape), fmt, gen))
            else:
                p.normal_(0.0, std)
    model.to(torch.float32).save_pretrained(folder)
    build_tokenizer(folder)


def dequantized_reference(ref):
    """transformers' model in float32 holding the quantized folder's stored values dequantized
    (its LM head int8-quantized as the plain quantized model holds it): the model the plain
    quantized model and the engine compute, with exact weights and float32 activations."""
    from transformers import AutoConfig, AutoModelForCausalLM

    doc = read_quantization(ref.path)
    cpu = torch.device("cpu")
    values = {}
    with CheckpointReader(ref.path) as reader:
        for name in doc["linears"]:
            values[f"{name}.weight"] = read_quant_weight(reader, name, doc).dequantize()
        for x in ref.spec.experts:
            gate_up, down = [], []
            for e in range(x.num_experts):
                parts = read_stored_expert(reader, x, e, torch.float32)
                w = {k: v.dequantize() if isinstance(v, QuantWeight) else v for k, v in parts.items()}
                gate_up.append(torch.cat((w["gate"], w["up"])))
                down.append(w["down"])
            values[x.gate_up_name], values[x.down_name] = torch.stack(gate_up), torch.stack(down)
        for key in reader.index:
            base = key.split(".weight.")[0]
            if ".experts." not in key and base not in doc["linears"]:
                values[key] = reader.read(key, torch.float32, cpu)
    values["lm_head.weight"] = quantize(values["lm_head.weight"], "int8").dequantize()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ref.path)).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """(arch, format) -> its tiny float folder on that format's grid, built once."""
    out = {}
    for arch, fmt in CASES:
        out[arch, fmt] = tmp_path_factory.mktemp(f"{arch}-{fmt}-float")
        build_tiny_moe(arch, out[arch, fmt], fmt)
    return out


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def moe(request, floats, tmp_path_factory):
    """(format, ref of the quantized folder, plain model, its greedy tokens, its prompt logits)."""
    arch, fmt = request.param
    src = resolve_model(str(floats[arch, fmt]), need_weights=True)
    folder = ensure_quantized(src, fmt, 32, tmp_path_factory.mktemp("q") / f"{arch}-{fmt}")
    ref = resolve_model(str(folder), need_weights=True, quant="auto")
    plain = load_quantized(ref)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        tokens = plain.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = plain.model(ids).logits
    return fmt, ref, plain, tokens, logits


def _load(ref, plan_name, backend, experts=None):
    """The engine with `plan_name`'s linears and `experts` (default: the same plan's) experts."""
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS, staging_buffers=2, prefetch_depth=1)
    return load_hetero_model(
        ref,
        placements(ref.spec, PLANS[plan_name]),
        runtime,
        backend,
        progress=False,
        experts=expert_placements(ref.spec, EXPERTS[experts or plan_name]),
    )


def _close(got: torch.Tensor, want: torch.Tensor, share: float = 0.02) -> None:
    """Logits within `share` of the largest (bfloat16 rounding of a few products apart)."""
    err = float((got.float() - want.float()).abs().max())
    assert err <= share * float(want.float().abs().max()), err


def _near_ties_only(model, sequence, reference, tol, device="cpu"):
    """Teacher-forced along the reference's greedy `sequence`: wherever `model`'s argmax
    (on `device`) differs, the reference's margin between its token and the model's is at
    most `tol` of its logit range (a near tie that rounding may flip)."""
    with torch.no_grad():
        got = model(sequence.to(device)).logits[0, len(PROMPT[0]) - 1 : -1].float().cpu()
        want = reference(sequence).logits[0, len(PROMPT[0]) - 1 : -1].float()
    for pos in range(got.shape[0]):
        a, b = int(got[pos].argmax()), int(want[pos].argmax())
        if a != b:
            margin = float(want[pos, b] - want[pos, a]) / float(want[pos].max() - want[pos].min())
            assert margin <= tol, f"position {pos}: {a} against the reference's {b}, margin {margin:.3g}"


def test_every_expert_part_is_stored_in_the_format_asked_and_counted_so(moe):
    fmt, ref, *_ = moe
    doc = read_quantization(ref.path)
    assert doc["schema_version"] == 3 and doc["format"] == fmt
    assert doc["experts"] == {x.name: [fmt] * 3 for x in ref.spec.experts}
    label = "int8" if fmt == "int8" else "int4-g32"
    assert ref.spec.quant_label == ref.spec.experts_quant_label == label
    for x in ref.spec.experts:
        h, i = x.hidden_size, x.intermediate_size
        assert x.expert_bytes == 2 * weight_bytes(fmt, i, h) + weight_bytes(fmt, h, i)
        assert x.expert_bytes < x.expert_parameters * 2 * (0.6 if fmt == "int8" else 0.35)
    with CheckpointReader(ref.path) as reader:
        assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in reader.index)
        stored = sum(
            reader.raw(k).numel() * reader.raw(k).element_size() for k in reader.index if ".experts." in k
        )
    assert stored == ref.spec.expert_weight_bytes


@pytest.mark.parametrize("backend", [CpuBackend, StrictBackend])
def test_an_all_cpu_plan_is_the_plain_quantized_model(moe, backend):
    """Every expert on the CPU: the plain model's CpuExperts, its tokens; on the CPU stand-in
    its logits bit for bit (the LM head int8 as the plain model's); the strict stand-in keeps
    the head bfloat16 on its "device", as a GPU does."""
    _, ref, plain, tokens, logits = moe
    with _load(ref, "all_cpu", backend()) as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT)).logits
        out = loaded.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        if backend is CpuBackend:
            assert torch.equal(got, logits) and out.tolist() == tokens.tolist()
            if ACTIVATIONS == "float32":  # both: each layer's CPU experts one call a token
                assert loaded.fused["experts"] == plain.fused["experts"] == 2
        else:
            _close(got, logits)
            _near_ties_only(loaded.model, tokens, plain.model, greedy_tolerance("bfloat16"))
        stats = loaded.stats()
        assert stats["experts_cpu"] > 0 and stats["experts_gpu"] == 0


@pytest.mark.parametrize("experts", ["mixed", "random"])
@pytest.mark.parametrize("backend", [CpuBackend, StrictBackend])
def test_mixed_expert_placements_give_the_plain_quantized_models_tokens(moe, experts, backend):
    """Half the experts on the GPU side (their stored parts there, dequantized per part into
    bfloat16), the others on the CPU, every linear whole on the CPU: the plain model's logits
    within bfloat16 rounding (the int4 kernel holds scales in bfloat16: 1-2 % of an expert's
    output apart from the dequantized weights) and its greedy tokens but at near ties."""
    _, ref, plain, tokens, logits = moe
    with _load(ref, "all_cpu", backend(), experts) as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT)).logits
        _close(got, logits)
        _near_ties_only(loaded.model, tokens, plain.model, greedy_tolerance("bfloat16"))
        stats = loaded.stats()
        assert stats["experts_cpu"] > 0 and stats["experts_gpu"] > 0


def _load_streamed(ref, backend, experts):
    streamed = [replace(x, stream_prefill=True) for x in expert_placements(ref.spec, EXPERTS[experts])]
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS, staging_buffers=2, prefetch_depth=1)
    plan = placements(ref.spec, PLANS["all_cpu"])
    return load_hetero_model(ref, plan, runtime, backend, progress=False, experts=streamed)


@pytest.mark.parametrize("experts", ["all_cpu", "mixed"])
@pytest.mark.parametrize("backend", [CpuBackend, StrictBackend])
def test_quantized_experts_streamed_in_prefill_give_the_plain_models_tokens(moe, experts, backend):
    """Layers placed with `stream_prefill`: in prefill each CPU-side expert's stored parts
    cross to the GPU side through the two staging slots and are dequantized there (the strict
    stand-in poisons a slot read too early or refilled too soon); decode computes them on the
    CPU. The plain model's logits within bfloat16 rounding and its greedy tokens but at near
    ties; each slot holds one expert as the CPU holds it, no more than the plan counts."""
    _, ref, plain, tokens, logits = moe
    with _load_streamed(ref, backend(), experts) as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT)).logits
        _close(got, logits)
        _near_ties_only(loaded.model, tokens, plain.model, greedy_tolerance("bfloat16"))
        assert loaded.stats()["experts_streamed"] > 0 and loaded.stats()["experts_cpu"] == 0
        loaded.model.generate(torch.tensor(PROMPT), max_new_tokens=2, do_sample=False)
        assert loaded.stats()["experts_cpu"] > 0  # decode: on the CPU, as before
        engine = engine_context(loaded.model)
        one = engine.experts[0].cpu_experts[0].nbytes
        x = ref.spec.experts[0]
        assert engine.expert_stream.nbytes == 2 * one
        assert one <= x.host_expert_bytes(4) < 2 * x.expert_parameters  # as stored, not in bfloat16


def test_quantized_experts_in_torchs_packed_layout_are_not_streamed(moe):
    """Without hetegen's CPU kernels the CPU holds torch's packed layout, which has no stored
    form to copy: the layer computes its experts on the CPU in prefill too, as a plan without
    streaming does, and no slot is allocated."""
    _, ref, *_ = moe
    with cpu_kernels.torch_kernels(), torch.no_grad():
        with _load(ref, "all_cpu", CpuBackend()) as loaded:
            want = loaded.model(torch.tensor(PROMPT)).logits
        with _load_streamed(ref, CpuBackend(), "all_cpu") as loaded:
            assert torch.equal(loaded.model(torch.tensor(PROMPT)).logits, want)
            assert engine_context(loaded.model).expert_stream is None
            assert loaded.stats()["experts_streamed"] == 0 and loaded.stats()["experts_cpu"] > 0


def _decode_logits(model, sequence, device="cpu") -> torch.Tensor:
    """Teacher-forced along `sequence` [1, n] one decode step at a time after the prompt's
    prefill (on `device`): the logits [n - len(PROMPT), V] that predicted its tokens after the
    prompt."""
    keyword, sequence = cache_keyword(model), sequence.to(device)
    with torch.no_grad():
        out = model(sequence[:, : len(PROMPT[0])], use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for t in range(len(PROMPT[0]), sequence.shape[1] - 1):
            out = model(sequence[:, t : t + 1], use_cache=True, **{keyword: cache})
            rows.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(rows).float().cpu()


@pytest.mark.parametrize(("experts", "stream"), [("all_cpu", False), ("mixed", True)])
@pytest.mark.parametrize("backend", [CpuBackend, StrictBackend])
def test_a_decode_split_gives_the_plain_models_logits(moe, backend, experts, stream):
    """`split_units` = one split step: in decode each chosen CPU-side expert's first units
    cross to the GPU side through the staging slots (the strict stand-in poisons a slot read
    too early) and are computed there while the CPU computes the rest; prefill adds the two
    where the expert is computed (with `stream_prefill`, both streamed). Each decode step's
    logits are the plain model's within bfloat16 rounding, its greedy choice but at near ties;
    a slot holds the largest piece streamed, as stored."""
    _check_decode_split(moe, backend(), experts, stream)


def _check_decode_split(moe, backend, experts: str, stream: bool) -> None:
    _, ref, plain, tokens, _ = moe
    step = ref.spec.experts[0].split_step
    chosen = expert_placements(ref.spec, EXPERTS[experts])
    split = [replace(x, split_units=step, stream_prefill=stream) for x in chosen]
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS, staging_buffers=2, prefetch_depth=1)
    plan = placements(ref.spec, PLANS["all_cpu"])
    with load_hetero_model(ref, plan, runtime, backend, progress=False, experts=split) as loaded:
        got = _decode_logits(loaded.model, tokens, backend.device)
        with torch.no_grad():
            want = plain.model(tokens).logits[0, len(PROMPT[0]) - 1 : -1].float()
        _close(got, want)
        tol = greedy_tolerance("bfloat16")
        for pos in range(got.shape[0]):
            a, b = int(got[pos].argmax()), int(want[pos].argmax())
            margin = float(want[pos, b] - want[pos, a]) / float(want[pos].max() - want[pos].min())
            assert a == b or margin <= tol, f"step {pos}: {a} against {b}, margin {margin:.3g}"
        stats = loaded.stats()
        assert stats["experts_split"] > 0 and stats["experts_cpu"] > 0
        assert (stats["experts_streamed"] > 0) == stream
        engine = engine_context(loaded.model)
        layer = engine.experts[0]
        assert layer.splits and len(layer.cpu_firsts) == len(layer.cpu_experts) > 0
        first, rest = layer.cpu_firsts[0].nbytes, layer.cpu_experts[0].nbytes
        assert engine.expert_stream.nbytes == 2 * (max(first, rest) if stream else first)
        if backend.device.type == "cuda":  # a real GPU: the pieces it streams, page-locked
            assert all(arena.is_pinned() for x in engine.experts for arena in x.pinned)


def test_a_split_expert_adds_up_to_the_whole(moe):
    """split_expert: the first units' expert plus the rest's is the whole expert (the same
    kernels on the same stored values, summed in another order)."""
    fmt, ref, *_ = moe
    x = ref.spec.experts[0]
    with CheckpointReader(ref.path) as reader:
        parts = read_stored_expert(reader, x, 1, torch.float32)
    act = torch.nn.SiLU()
    inputs = torch.randn(3, x.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = CpuExpert(parts, act)(inputs)
    first, rest = split_expert(parts, x.split_step)
    extra = 2 * x.hidden_size if fmt == "int8" else 0  # int8: down's per-row scales held twice
    assert CpuExpert(first, act).nbytes + CpuExpert(rest, act).nbytes == CpuExpert(parts, act).nbytes + extra
    got = CpuExpert(first, act)(inputs) + CpuExpert(rest, act)(inputs)
    assert torch.allclose(got, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))


def test_int4_columns_split_by_whole_groups_only():
    w = quantize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), "int4", 32)
    assert w.columns(32, 64).dequantize().equal(w.dequantize()[:, 32:])
    assert w.rows(1, 3).dequantize().equal(w.dequantize()[1:3])
    with pytest.raises(ValueError, match="groups of 32"):
        w.columns(0, 16)


def test_a_split_off_the_step_is_refused_before_loading(moe):
    _, ref, *_ = moe
    x = ref.spec.experts[0]
    bad = [replace(p, split_units=x.split_step // 2) for p in expert_placements(ref.spec, EXPERTS["all_cpu"])]
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS, staging_buffers=2, prefetch_depth=1)
    plan = placements(ref.spec, PLANS["all_cpu"])
    with pytest.raises(PlanError, match="intermediate units, not a multiple") as err:
        load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False, experts=bad)
    assert "hetegen plan" in err.value.hint


@pytest.mark.parametrize("backend", [CpuBackend, StrictBackend])
def test_plans_splitting_the_linears_too_run_both_sides(moe, backend):
    """The mixed plan: linears split (their CPU rows through the packed kernels, the others
    dequantized) or resident, every other expert on the GPU side. The int4 kernel's bfloat16
    scales put its rows 1-2 % apart from the dequantized ones, enough to tip a random tiny
    router's near ties, so this checks the run and the first position, not every token."""
    _, ref, _, _, logits = moe
    with _load(ref, "mixed", backend()) as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT)).logits
        _close(got[:, 0], logits[:, 0], 0.05)
        out = loaded.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.shape[1] == len(PROMPT[0]) + NEW_TOKENS
        stats = loaded.stats()
        assert stats["experts_cpu"] > 0 and stats["experts_gpu"] > 0 and stats["copies_issued"] > 0


@contextlib.contextmanager
def routing(model, names, record: dict, force: dict | None = None):
    """Record each experts module's routing (top_k_index, top_k_weights) per call into
    `record`; with `force`, call the experts with `force`'s routing instead of the router's."""

    def hook(name):
        def pre(module, args):
            record.setdefault(name, []).append((args[1], args[2]))
            if force is None:
                return None
            index, weights = force[name][len(record[name]) - 1]
            return (args[0], index, weights.to(args[2].dtype))

        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="hetegen's CPU kernels are unavailable")
def test_moe_layers_decode_as_one_step_each_with_the_parts_only_result(moe):
    """A MoE block of a router and routed experts only (all but Qwen2-MoE, whose shared expert
    keeps transformers' block) decodes as one step adding into its layer's output, so its
    layers and the whole model get their steps too. Decoding on hetegen's cache, where the steps
    run, gives the greedy tokens and logits of the same model with those steps taken away and
    only its parts fused, within 1e-4 of the largest logit as every fusion is checked: the
    experts now add into the residual, a float32 rounding apart, which the next kernel's int16
    rounding of its input can widen to 1/65,534 of a block (measured up to 3e-5 here)."""
    _, _, plain, _, _ = moe
    model, config = plain.model, plain.model.config
    n = 0 if config.model_type == "qwen2_moe" else config.num_hidden_layers
    assert (plain.fused["layers"], plain.fused["model"]) == (n, int(n > 0))
    if n:
        assert plain.fused["mlps"] == n  # the MoE blocks: these models have no dense MLP
    prompt = PROMPT[0]
    got_tokens, got = greedy_steps(model, new_cache(model, 32), prompt, NEW_TOKENS)
    steps = [model, *model.model.layers, *(layer.mlp for layer in model.model.layers)]
    taken = {m: vars(m).pop("forward") for m in steps if "forward" in vars(m)}
    try:
        assert len(taken) == 2 * n + int(n > 0)
        want_tokens, want = greedy_steps(model, new_cache(model, 32), prompt, NEW_TOKENS)
    finally:
        for m, forward in taken.items():
            m.forward = forward
    assert got_tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4 * b.abs().max().item())
    if n:
        assert model.forward.taken >= NEW_TOKENS  # the model's step ran, not its own forward
    assert direct_check.layout_of(model) is None  # the direct start reads dense MLPs only


def test_the_plain_quantized_model_computes_its_dequantized_weights(moe):
    """Against transformers in float32 on the stored values dequantized, along the plain
    model's greedy sequence: its routers choose the plain model's experts but at near ties
    (a tiny random router has some: measured 0-2 of 34 choices per model apart, each moving
    that position's logits 15-50 %); given the plain model's choices, the logits are within
    5 % of the largest (bfloat16 activations against float32; measured 0.7-2.8 %) and pick the
    plain model's greedy tokens but at near ties."""
    _, ref, plain, tokens, _ = moe
    reference = dequantized_reference(ref)
    assert any(isinstance(m, QuantExperts) for m in plain.model.modules())
    names = [x.name for x in ref.spec.experts]
    chosen: dict = {}
    own: dict = {}
    with torch.no_grad():
        with routing(plain.model, names, chosen):
            got = plain.model(tokens).logits[0].float()
        with routing(reference, names, own, force=chosen):
            want = reference(tokens).logits[0]
    apart = sum(
        int((own[n][0][0].sort(-1).values != chosen[n][0][0].sort(-1).values).any(-1).sum()) for n in names
    )
    assert apart <= 0.1 * tokens.shape[1] * len(names), apart
    _close(got, want, 0.05)
    tol = greedy_tolerance("bfloat16")
    for pos in range(len(PROMPT[0]) - 1, tokens.shape[1] - 1):  # the positions that chose new tokens
        token, best = int(tokens[0, pos + 1]), int(want[pos].argmax())
        if best != token:
            margin = float(want[pos, best] - want[pos, token]) / float(want[pos].max() - want[pos].min())
            assert margin <= tol, (
                f"position {pos}: the reference's {best} against {token}, margin {margin:.3g}"
            )


@pytest.mark.parametrize(("plan_name", "split"), [("all_cpu", False), ("mixed", False), ("mixed", True)])
def test_the_engine_holds_the_expert_bytes_the_planner_counts(moe, plan_name, split):
    """plan.memory (the planner's and the RAM check's count) equals what the engine holds:
    the CPU's experts as their packed kernels (split: as their two pieces), the GPU side's as
    stored."""
    _, ref, *_ = moe
    experts = expert_placements(ref.spec, EXPERTS[plan_name])
    if split:
        experts = [replace(x, split_units=ref.spec.experts[0].split_step) for x in experts]
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS, staging_buffers=2, prefetch_depth=1)
    plan = placements(ref.spec, PLANS[plan_name])
    with load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False, experts=experts) as loaded:
        context = engine_context(loaded.model)
        placed = [x.placement for x in context.experts]
        gpu, host = experts_bytes(ref.spec, placed, RuntimeSettings().cpu_dtype_decode)
        assert sum(x.host_bytes for x in context.experts) == host
        on_gpu = sum(b.numel() * b.element_size() for x in context.experts for b in x.gpu_experts.buffers())
        assert on_gpu == gpu
        split = [lin.placement for lin in context.linears]
        runtime = RuntimeSettings(weights_dtype=ACTIVATIONS)
        linears = host_memory(split, ACTIVATIONS, runtime.cpu_dtypes, quant=ref.spec.quant_map())
        assert loaded.memory["host_weight_bytes"] == linears.weights_bytes + linears.cpu_copy_bytes + host


@pytest.mark.cuda
@pytest.mark.parametrize("experts", ["all_cpu", "mixed", "all_streamed"])
def test_cuda_quantized_experts_give_the_plain_quantized_models_tokens(moe, experts):
    """On a real GPU: the GPU side's experts dequantized there while the CPU computes its own
    with the packed kernels (every linear on the CPU): the plain model's logits within
    bfloat16 rounding (the head stays bfloat16 on the GPU) and its greedy tokens but at near
    ties."""
    from hetegen_cli.core.devices import get_backend

    _, ref, plain, tokens, logits = moe
    backend = get_backend("cuda")
    with _load(ref, "all_cpu", backend, experts) as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT, device=backend.device)).logits.float().cpu()
        _close(got, logits)
        _near_ties_only(loaded.model, tokens, plain.model, greedy_tolerance("bfloat16"), backend.device)
        stats = loaded.stats()
        assert (stats["experts_cpu"] > 0) == (experts != "all_streamed")
        assert (stats["experts_gpu"] > 0) == (experts != "all_cpu")


@pytest.mark.cuda
def test_cuda_streamed_quantized_experts_give_the_plain_quantized_models_tokens(moe):
    """On a real GPU: every CPU-side expert's stored parts copied from pinned memory on the
    side stream in prefill and dequantized there, decode on the CPU: the plain model's logits
    within bfloat16 rounding and its greedy tokens but at near ties."""
    from hetegen_cli.core.devices import get_backend

    _, ref, plain, tokens, logits = moe
    backend = get_backend("cuda")
    with _load_streamed(ref, backend, "all_cpu") as loaded, torch.no_grad():
        got = loaded.model(torch.tensor(PROMPT, device=backend.device)).logits.float().cpu()
        _close(got, logits)
        _near_ties_only(loaded.model, tokens, plain.model, greedy_tolerance("bfloat16"), backend.device)
        assert loaded.stats()["experts_streamed"] > 0
        assert all(arena.is_pinned() for x in engine_context(loaded.model).experts for arena in x.pinned)


@pytest.mark.cuda
@pytest.mark.parametrize(("experts", "stream"), [("all_cpu", False), ("mixed", True)])
def test_cuda_decode_split_gives_the_plain_quantized_models_logits(moe, experts, stream):
    """On a real GPU: each chosen CPU-side expert's first units copied from pinned memory on
    the side stream and dequantized there while the CPU computes the rest, every decode step
    the plain model's logits within bfloat16 rounding."""
    from hetegen_cli.core.devices import get_backend

    _check_decode_split(moe, get_backend("cuda"), experts, stream)


@pytest.fixture
def int4_copy(floats, tmp_path):
    src = resolve_model(str(floats["qwen3_moe", "int4"]), need_weights=True)
    folder = ensure_quantized(src, "int4", 32, tmp_path / "built")
    shutil.copytree(folder, tmp_path / "q")
    return tmp_path / "q"


def _drop(folder, *keys):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for key in keys:
        tensors.pop(key)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_quantized_folder_missing_an_expert_is_refused_before_loading(int4_copy):
    base = "model.layers.1.mlp.experts.2.up_proj.weight"
    _drop(int4_copy, f"{base}.q", f"{base}.scale", f"{base}.min")
    with pytest.raises(ModelError, match=r"lacks model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight\.q"):
        spec_from_folder(int4_copy)
    assert_error(cli("plan", "--model", str(int4_copy)), "the up weight of expert 2 of 8 in layer 1")


def test_a_quantized_folder_missing_one_part_of_an_expert_is_refused(int4_copy):
    _drop(int4_copy, "model.layers.0.mlp.experts.7.down_proj.weight.min")
    with pytest.raises(
        ModelError, match=r"lacks .*experts\.7\.down_proj\.weight\.min \(the down weight of expert 7"
    ):
        spec_from_folder(int4_copy)


def test_a_document_naming_experts_the_model_lacks_is_refused(int4_copy):
    path = int4_copy / "quantization.json"
    doc = json.loads(path.read_text())
    doc["experts"]["model.layers.5.mlp.experts"] = ["int4", "int4", "int4"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"names routed experts model\.layers\.5\.mlp\.experts"):
        spec_from_folder(int4_copy)


def test_hetegen_quantize_and_run_quant_int4_on_a_moe_folder(floats, tmp_path):
    """The command line end to end: `hetegen quantize` writes the experts quantized, and `run
    --quant int4 --plan` (half the experts on the GPU side, on the CPU stand-in) generates."""
    from hetegen_cli.plan.document import save_plan
    from hetegen_cli.plan.manual import manual_plan

    out = tmp_path / "q"
    result = cli(
        "quantize", "--model", str(floats["mixtral", "int4"]), "--quant", "int4", "--output", str(out)
    )
    assert result.exit_code == 0, result.output
    assert read_quantization(out)["experts"]
    spec = resolve_model(str(out), need_weights=True, quant="auto").spec
    rng = random.Random(0)
    gpu = {x.name: sorted(rng.sample(range(x.num_experts), 2)) for x in spec.experts}
    runtime = RuntimeSettings(weights_dtype=spec.dtype)
    plan = manual_plan(
        spec, cpu_fraction_prefill=0.5, cpu_fraction_decode=0.25, runtime=runtime, experts_gpu=gpu
    )
    path = save_plan(plan, tmp_path / "plan.json")
    args = ("run", "--model", str(out), "--prompt", "hi", "-n", "3", "--json", "--device", "cpu")
    result = cli(*args, "--plan", str(path))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["quant"] == "int4" and len(doc["token_ids"]) == 3
    assert doc["fused"] is None  # a split plan runs the pipeline: no direct modules to fuse
    assert doc["plan"]["experts_on_gpu"] == 4


@pytest.mark.parametrize(
    "experts",
    [
        {"model.layers.0.mlp.experts": ["int4", "int4"]},  # two parts, not three
        {"model.layers.0.mlp.experts": ["int4", "int4", "int3"]},  # no such format
        {"model.layers.0.mlp.experts": [None, None, None]},  # nothing quantized
        {},
    ],
)
def test_a_malformed_experts_entry_is_refused(int4_copy, experts):
    path = int4_copy / "quantization.json"
    doc = json.loads(path.read_text())
    doc["experts"] = experts
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="not a hetegen quantization document of schema 1, 2 or 3"):
        spec_from_folder(int4_copy)
