"""The engine on tiny OPT / LLaMA checkpoints: greedy tokens equal transformers' own generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hetegen_cli.core.devices import CpuBackend, get_backend
from hetegen_cli.core.errors import ModelError, PlanError
from hetegen_cli.engine.cpu_linear import CpuLinear
from hetegen_cli.engine.hetero_model import engine_context, load_hetero_model
from hetegen_cli.engine.split_linear import HeteroLinear
from hetegen_cli.models.loading.loader import LoadedModel
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings
from tests.engine.conftest import NEW_TOKENS, PLANS, PROMPT, placements, random_rows

FP32 = RuntimeSettings(
    weights_dtype="float32",
    cpu_dtype_prefill="float32",
    cpu_dtype_decode="float32",
    cpu_threads=1,
    staging_buffers=2,
    prefetch_depth=1,
    requires_gpu=False,
)


def _load(ref, plan, runtime=FP32) -> LoadedModel:
    return load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_greedy_tokens_equal_transformers(models, model_name, plan_name):
    ref, want, _ = models[model_name]
    plan = placements(ref.spec, PLANS[plan_name])
    with _load(ref, plan) as hm:
        with torch.no_grad():
            got = hm.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = hm.stats()
    assert got.tolist() == want.tolist()
    split = sum(not p.resident for p in plan)
    assert stats["split_linears"] == split
    assert stats["split_calls"] == split * (NEW_TOKENS)  # 1 prefill + 7 decode forwards
    if plan_name == "all_cpu":
        assert stats["bytes_streamed"] == 0 and stats["staging_bytes"] == 0
    else:
        assert stats["bytes_streamed"] > 0 and stats["prefetch_hits"] > 0


@pytest.mark.parametrize("plan_name", ["all_cpu", "random"])
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_without_a_pipeline_the_model_calls_its_linears_directly(models, model_name, plan_name):
    """All-CPU on the CPU backend, the model calls a CpuLinear per linear (OPT's with its
    bias) instead of its HeteroLinear, which stays with the engine for memory and counters;
    a plan that streams keeps every HeteroLinear. The tokens are transformers' either way."""
    ref, want, _ = models[model_name]
    plan = placements(ref.spec, PLANS[plan_name])
    with _load(ref, plan) as hm:
        context = engine_context(hm.model)
        called = [type(m) for m in hm.model.modules() if isinstance(m, (HeteroLinear, CpuLinear))]
        with torch.no_grad():
            got = hm.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = hm.stats()
    split = sum(not p.resident for p in plan)
    assert len(called) == len(context.linears) == split
    direct = plan_name == "all_cpu"
    assert set(called) == {CpuLinear if direct else HeteroLinear}
    assert context.direct_linears == (split if direct else 0)
    assert stats["split_calls"] == split * NEW_TOKENS
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_logits_and_cached_decode_step(models, model_name):
    ref, _, want_logits = models[model_name]
    with _load(ref, placements(ref.spec, PLANS["random"])) as hm:
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            out = hm.model(ids, use_cache=True)
            torch.testing.assert_close(out.logits, want_logits, rtol=1e-4, atol=1e-5)
            nxt = out.logits[:, -1:].argmax(-1)
            step = hm.model(nxt, past_key_values=out.past_key_values, use_cache=True)
            full = hm.model(torch.cat([ids, nxt], dim=1))
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
        assert (
            engine_context(hm.model).stats.prefill_passes == 2 and engine_context(hm.model).stats.passes == 3
        )


def _reference_with_prefill_cpu_rows_in_bf16(folder, plan):
    """transformers' fp32 model whose planned linears compute their prefill CPU rows [0, k)
    as the engine should: x and W[:k] in bfloat16, the result back in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    for p in plan:
        lin, k = modules[p.name], p.cpu_rows_prefill

        def forward(x, lin=lin, k=k):
            if x.shape[-2] == 1 or k == 0:  # decode (or no CPU rows): float32 as stored
                return F.linear(x, lin.weight, lin.bias)
            w = lin.weight
            head = F.linear(x.bfloat16(), w[:k].bfloat16()).float()
            y = torch.cat([head, F.linear(x, w[k:])], dim=-1)
            return y if lin.bias is None else y + lin.bias

        lin.forward = forward
    return model


@pytest.mark.parametrize("plan_name", ["all_cpu", "random"])
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_each_phase_runs_in_its_planned_cpu_format(
    models, model_name, plan_name, tiny_opt_dir, tiny_llama_dir
):
    """bfloat16 prefill + float32 decode CPU shares: the engine gives the greedy tokens and
    logits of a reference computing exactly those formats, and the prefill really ran in
    bfloat16 (its logits differ from float32's by more than float32 rounding)."""
    ref, _, fp32_logits = models[model_name]
    folder = tiny_opt_dir if model_name == "opt" else tiny_llama_dir
    plan = placements(ref.spec, PLANS[plan_name])
    runtime = replace(FP32, cpu_dtype_prefill="bfloat16")
    want_model = _reference_with_prefill_cpu_rows_in_bf16(folder, plan)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        want_tokens = want_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        want_logits = want_model(ids).logits
    with _load(ref, plan, runtime) as hm, torch.no_grad():
        got_tokens = hm.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        got_logits = hm.model(ids).logits
        assert hm.dtype == "float32+bfloat16"
        assert engine_context(hm.model).streaming == (plan_name != "all_cpu")
    assert got_tokens.tolist() == want_tokens.tolist()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got_logits, fp32_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_logits, fp32_logits, rtol=0.05, atol=0.05)


def test_prefetch_wraps_around_in_steady_decode(models):
    ref, _, _ = models["llama"]
    with _load(ref, placements(ref.spec, PLANS["all_streamed"])) as hm:
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            out = hm.model(ids, use_cache=True)  # pass 1: learns the order
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(2):  # passes 2-3: first decode misses once
                out = hm.model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            hm.reset_stats()
            for _ in range(3):
                out = hm.model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        stats = hm.stats()
    per_pass = len(ref.spec.linears)
    # every GPU share, including each pass's first linears, was issued during the previous pass
    assert stats["prefetch_misses"] == 0
    assert stats["prefetch_hits"] == 3 * per_pass
    assert stats["bytes_streamed"] == 3 * sum(lin.weight_bytes for lin in ref.spec.linears)


def test_bf16_weights_with_fp32_cpu_copy(models, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ref, _, _ = models["llama"]
    runtime = replace(FP32, weights_dtype="bfloat16")
    plan = placements(ref.spec, PLANS["mixed"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    with _load(ref, plan, runtime) as hm, torch.no_grad():
        got = hm.model(torch.tensor(PROMPT)).logits
        want = reference(torch.tensor(PROMPT)).logits
        mem = hm.stats()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    cpu_rows = sum(p.max_cpu_rows * p.in_features for p in plan if not p.resident)
    assert mem["cpu_copy_bytes"] == cpu_rows * 4


def test_tied_lm_head_can_be_split(models):
    ref, want, _ = models["opt"]  # OPT's checkpoint has no lm_head.weight (tied)
    head = ref.spec.lm_head
    plan = [
        *placements(ref.spec, PLANS["random"]),
        LinearPlacement("lm_head", -1, "lm_head", head.out_features, head.in_features, False, 96, 160),
    ]
    with _load(ref, plan) as hm, torch.no_grad():
        assert isinstance(hm.model.lm_head, HeteroLinear)
        got = hm.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.tolist() == want.tolist()


def test_loaded_model_is_complete(models):
    from transformers import AutoModelForCausalLM

    for name in ("opt", "llama"):
        ref, _, _ = models[name]
        with _load(ref, placements(ref.spec, PLANS["mixed"])) as hm:
            model = hm.model
            assert not [n for n, t in model.named_parameters() if t.is_meta]
            assert not [n for n, t in model.named_buffers() if t.is_meta]
            if name == "opt":
                assert model.lm_head.weight is model.get_input_embeddings().weight
            else:
                stock = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
                torch.testing.assert_close(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq)
            kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj"))}
            assert kinds == {"Linear", "HeteroLinear"}  # mixed plan: resident and split


@pytest.mark.parametrize(
    "bad, match",
    [
        ("model.layers.0.self_attn.qq_proj", "does not have"),
        ("model.layers.0.input_layernorm", "not nn.Linear"),
        ("model.layers.9.mlp.up_proj", "does not have"),
    ],
)
def test_bad_placements_are_refused(models, bad, match):
    ref, _, _ = models["llama"]
    plan = placements(ref.spec, PLANS["all_cpu"])
    plan[0] = replace(plan[0], name=bad)
    with pytest.raises(PlanError, match=match) as info:
        _load(ref, plan)
    assert info.value.hint


def test_wrong_shape_and_duplicates_are_refused(models):
    ref, _, _ = models["llama"]
    plan = placements(ref.spec, PLANS["all_cpu"])
    with pytest.raises(PlanError, match="in the plan"):
        _load(ref, [replace(plan[0], out_features=48, cpu_rows_prefill=48, cpu_rows_decode=48)])
    with pytest.raises(PlanError, match="twice"):
        _load(ref, [plan[0], plan[0]])


def test_model_without_weights_is_refused(models):
    ref, _, _ = models["llama"]
    with pytest.raises(ModelError, match="no local weights"):
        _load(replace(ref, path=None), [])


def test_empty_plan_is_plain_model(models):
    ref, want, _ = models["llama"]
    before = torch.get_num_threads()
    hm = _load(ref, [], replace(FP32, cpu_threads=1))
    with torch.no_grad():
        got = hm.model.generate(torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
    hm.close()
    assert got.tolist() == want.tolist()
    assert hm.stats()["split_linears"] == 0
    assert torch.get_num_threads() == before and engine_context(hm.model).closed


_RSS_SCRIPT = r"""
import gc, json, sys, threading, time, psutil, torch
from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.loading.meta import meta_model
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.plan.document import LinearPlacement, RuntimeSettings, round_rows
from tests.engine.conftest import NEW_TOKENS, PLANS, PROMPT, placements, random_rows
ref = resolve_model(sys.argv[1], need_weights=True)
plan = [LinearPlacement(l.name, l.layer_index, l.role, l.out_features, l.in_features, False,
                        0, round_rows(0.5, l.out_features)) for l in ref.spec.linears]
meta_model(ref.path, torch.float32)  # import transformers' modeling code before the baseline
proc = psutil.Process()
def anon():  # anonymous memory: RSS minus file-backed pages (the mmapped checkpoint)
    m = proc.memory_info()
    return m.rss - m.shared
for dtype in sys.argv[2:]:
    gc.collect()
    runtime = RuntimeSettings(weights_dtype=dtype, cpu_threads=1, requires_gpu=False)
    base_rss, base_anon = proc.memory_info().rss, anon()
    peak = {"rss": base_rss, "anon": base_anon, "done": False}
    def sample():
        while not peak["done"]:
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            peak["anon"] = max(peak["anon"], anon())
            time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    start = time.perf_counter()
    hm = load_hetero_model(ref, plan, runtime, CpuBackend(), progress=False)
    load_s = time.perf_counter() - start
    peak["done"] = True; t.join()
    s = hm.stats()
    print(json.dumps({"weights_dtype": dtype, "peak_rss_delta_bytes": peak["rss"] - base_rss,
                      "peak_anon_delta_bytes": peak["anon"] - base_anon,
                      "after_anon_delta_bytes": anon() - base_anon, "load_s": load_s,
                      "host_weight_bytes": s["host_weight_bytes"], "cpu_copy_bytes": s["cpu_copy_bytes"],
                      "device_weight_bytes": s["device_weight_bytes"], "staging_bytes": s["staging_bytes"]}))
    hm.close()
    del hm
"""


def _build_medium_llama(folder: Path) -> Path:
    """hidden 512, intermediate 2048, 4 layers: 16.8 M linear parameters (67 MB in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def test_host_peak_memory_close_to_weight_bytes(tmp_path):
    folder = _build_medium_llama(tmp_path / "medium-llama")
    # a fixed mmap threshold makes glibc return freed blocks, so the second load measures alike
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(folder), "float32", "bfloat16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.strip().splitlines()[-2:]:
        m = json.loads(line)
        held = m["host_weight_bytes"] + m["device_weight_bytes"] + m["staging_bytes"]
        # the engine's own allocations stay close to the bytes it holds: no second model copy
        assert m["peak_anon_delta_bytes"] <= 1.1 * held + 32 * 2**20, m
        assert m["after_anon_delta_bytes"] >= 0.9 * m["host_weight_bytes"], m


@pytest.mark.slow
def test_default_model_random_split():
    try:
        from hetegen_cli.models.formats.gguf import ensure_default_model  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"gguf_convert is not available yet ({exc})")
    from transformers import AutoModelForCausalLM

    try:
        ref = resolve_model(None, need_weights=True)
    except ModelError as exc:
        pytest.skip(f"default model unavailable: {exc.message}")
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    reference = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=8, do_sample=False)
    del reference
    runtime = replace(FP32, cpu_threads=2)
    with _load(ref, placements(ref.spec, random_rows(3)), runtime) as hm, torch.no_grad():
        got = hm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()


# ---------------------------------------------------------------- CUDA tier (skipped here)


@pytest.mark.cuda
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_cuda_greedy_tokens_equal_reference(models, model_name):
    from transformers import AutoModelForCausalLM

    ref, _, _ = models[model_name]
    backend = get_backend("cuda")
    reference = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32).to(backend.device).eval()
    ids = torch.tensor(PROMPT, device=backend.device)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    plan = placements(ref.spec, PLANS["mixed"])
    with load_hetero_model(ref, plan, FP32, backend, progress=False) as hm, torch.no_grad():
        got = hm.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = hm.stats()
    assert got.tolist() == want.tolist()
    assert stats["prefetch_hits"] > 0 and stats["pinned_bytes"] == stats["host_weight_bytes"]


@pytest.mark.cuda
def test_cuda_weights_pinned_and_copies_on_side_stream(models):
    ref, _, _ = models["llama"]
    backend = get_backend("cuda")
    runtime = replace(FP32, weights_dtype="float16", requires_gpu=True)
    with load_hetero_model(
        ref, placements(ref.spec, PLANS["random"]), runtime, backend, progress=False
    ) as hm:
        linears = engine_context(hm.model).linears
        assert linears and all(lin.host.gpu_home.is_pinned() for lin in linears if lin.host.gpu_home.numel())
        assert all(not c.is_pinned() for lin in linears for c in lin.host.copies.values())
        scheduler = engine_context(hm.model).scheduler
        assert scheduler.copy_stream is not None
        assert scheduler.copy_stream != backend.current_stream()
        assert all(b.device.type == "cuda" for b in scheduler.buffers)
        with torch.no_grad():
            out = hm.model(torch.tensor(PROMPT, device=backend.device))
        assert out.logits.device.type == "cuda" and torch.isfinite(out.logits).all()
        assert hm.stats()["bytes_streamed"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("model_name", ["opt", "llama"])
def test_cuda_generate_under_inference_mode_then_release(models, model_name):
    """As `hetegen run` drives it (run.generate, inference mode, the worker thread writing
    pinned output slots): greedy tokens equal the reference; close() unpins the arena."""
    from hetegen_cli.run.generate import generate

    ref, want, _ = models[model_name]
    backend = get_backend("cuda")
    runtime = replace(FP32, requires_gpu=True, pin_weights=True)

    class Ids:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    with load_hetero_model(ref, placements(ref.spec, PLANS["mixed"]), runtime, backend, progress=False) as hm:
        got = generate(
            hm.model,
            Ids(),
            PROMPT[0],
            max_new_tokens=NEW_TOKENS,
            eos_ids=set(),
            sync=hm.sync,
            device=hm.device,
        ).token_ids
        assert hm.stats()["pinned_bytes"] > 0
    assert got == want[0, len(PROMPT[0]) :].tolist()
    assert engine_context(hm.model).arena.block is None
