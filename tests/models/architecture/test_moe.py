"""Mixture-of-experts models: the experts as plannable units in the spec, the presets against
their model cards, and bad input (expert counts, top-k, a checkpoint missing an expert)
refused with one clear error before loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.derive import derive_layout
from hetegen_cli.models.architecture.folder import spec_from_folder
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.shapes import presets
from hetegen_cli.models.shapes.experts import expected_distinct
from tests.helpers import assert_error, cli
from tests.models.architecture.test_architectures import TINY
from tests.tiny_models import build_tokenizer

#: (total, active) parameters in billions as the model cards state them
MOE_CARDS = {
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen3-235b-a22b": (235.0, 22.0),
    "mixtral-8x7b": (46.7, 12.9),
    "olmoe-1b-7b": (6.9, 1.3),
}


@pytest.mark.parametrize("name", sorted(MOE_CARDS))
def test_moe_presets_hold_the_total_and_active_parameters_of_their_model_cards(name):
    spec = spec_from_config(presets.preset_config(name), name)
    total, active = MOE_CARDS[name]
    assert spec.parameter_count / 1e9 == pytest.approx(total, rel=0.015)
    # 1.5 %, or the card's figure is the count cut after its last digit: Qwen3-30B-A3B
    # activates 3.353B parameters (8 of 128 experts, attention, router, both embeddings),
    # 1.6 % above the 3.3B its card states (its 30.5B total is 30.53B cut the same way)
    got = spec.active_parameter_count / 1e9
    assert got == pytest.approx(active, rel=0.015) or active <= got < active + 0.1
    assert spec.experts and all(x.top_k < x.num_experts for x in spec.experts)


def test_experts_are_counted_once_outside_the_fixed_bytes_and_the_router_is_fixed():
    spec = spec_from_config(presets.preset_config("qwen3-30b-a3b"), "q")
    x = spec.experts[0]
    assert (x.name, x.layer_index, x.num_experts, x.top_k) == ("model.layers.0.mlp.experts", 0, 128, 8)
    assert x.tensors["model.layers.0.mlp.experts.gate_up_proj"] == (128, 2 * 768, 2048)
    assert "model.layers.0.mlp.gate.weight" in spec.tensors  # the router: a fixed tensor
    assert not any("experts" in lin.name or lin.name.endswith(".gate") for lin in spec.linears)
    assert spec.total_weight_bytes == spec.parameter_count * 2  # bfloat16, untied head
    assert spec.expert_weight_bytes == 48 * 128 * 3 * 2048 * 768 * 2


def test_a_dense_layout_has_no_experts_key():
    from transformers import AutoConfig

    layout = derive_layout(AutoConfig.for_model("llama", **TINY["llama"]).to_dict(), "llama")
    assert "experts" not in layout


def test_expected_distinct_experts():
    assert expected_distinct(128, 8, 1) == pytest.approx(8)
    assert expected_distinct(8, 2, 0) == 0
    assert expected_distinct(8, 2, 1000) == pytest.approx(8)
    assert 8 < expected_distinct(128, 8, 2) < 16


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            {"num_experts": 4, "num_local_experts": 8},
            "inconsistent expert counts: num_experts 4 and num_local_experts 8",
        ),
        (
            {"num_experts": 4, "num_experts_per_tok": 5},
            "num_experts_per_tok 5 is not between 1 and the 4 experts",
        ),
        (
            {"num_experts": 4, "num_experts_per_tok": 0},
            "num_experts_per_tok 0 is not between 1 and the 4 experts",
        ),
    ],
)
def test_inconsistent_expert_configs_are_refused_before_building(extra, needle):
    config = {**TINY["qwen3_moe"], "model_type": "qwen3_moe", **extra}
    with pytest.raises(ModelError, match=needle):
        spec_from_config(config, "x")


def test_gpt_oss_is_refused_with_the_reason():
    config = {**TINY["llama"], "model_type": "gpt_oss", "num_local_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(ModelError, match="attention sinks"):
        spec_from_config(config, "x")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen3-MoE folder (4 experts, stored one tensor per expert as transformers saves)."""
    from tests.helpers import tiny_moe_folder

    return tiny_moe_folder(tmp_path_factory.mktemp("moe"), num_experts=4)


@pytest.fixture
def moe_copy(tiny_moe, tmp_path):
    folder = tmp_path / "moe"
    shutil.copytree(tiny_moe, folder)
    return folder


def _edit_tensors(folder, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_tiny_moe_folder_is_read_with_its_experts(tiny_moe):
    spec, warnings = spec_from_folder(tiny_moe)
    assert warnings == ()
    assert [x.num_experts for x in spec.experts] == [4, 4]


def test_a_checkpoint_missing_an_expert_is_refused_before_loading(moe_copy):
    _edit_tensors(moe_copy, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(ModelError, match=r"lacks the up weight of expert 2 of 4 in layer 1"):
        spec_from_folder(moe_copy)
    assert_error(cli("plan", "--model", str(moe_copy)), "expert 2 of 4", "config.json")


def test_a_checkpoint_with_more_experts_than_its_config_is_refused(moe_copy):
    def add_expert(t):
        for part in ("gate_proj", "up_proj", "down_proj"):
            first = t[f"model.layers.0.mlp.experts.0.{part}.weight"]
            t[f"model.layers.0.mlp.experts.4.{part}.weight"] = first.clone()

    _edit_tensors(moe_copy, add_expert)
    with pytest.raises(ModelError, match=r"more than the 4 experts config\.json says in layer 0"):
        spec_from_folder(moe_copy)


def test_a_config_with_fewer_experts_than_the_checkpoint_is_refused(moe_copy):
    config = json.loads((moe_copy / "config.json").read_text())
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            config[key] = 3
    (moe_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"more than the 3 experts config\.json says in layer 0"):
        spec_from_folder(moe_copy)


def _fuse(keep: int):
    """An edit storing each layer's first `keep` experts fused, as transformers holds them."""

    def fuse(t):
        for layer in (0, 1):
            base = f"model.layers.{layer}.mlp.experts"
            gate_up = [
                torch.cat([t.pop(f"{base}.{e}.gate_proj.weight"), t.pop(f"{base}.{e}.up_proj.weight")])
                for e in range(4)
            ]
            down = [t.pop(f"{base}.{e}.down_proj.weight") for e in range(4)]
            t[f"{base}.gate_up_proj"] = torch.stack(gate_up[:keep]).contiguous()
            t[f"{base}.down_proj"] = torch.stack(down[:keep]).contiguous()

    return fuse


def test_a_fused_checkpoint_runs_through_the_engine_with_transformers_tokens(moe_copy):
    """Experts read from fused tensors (not one tensor per expert), a random half of each
    layer on the GPU side, on the strict stand-in: transformers' greedy tokens."""
    from hetegen_cli.engine.hetero_model import load_hetero_model
    from hetegen_cli.models.loading.source import resolve_model
    from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
    from tests.engine.test_strict_backend import FP32, _generate
    from tests.helpers import transformers_greedy
    from tests.models.architecture.test_architectures import NEW_TOKENS, PROMPT
    from tests.strict import StrictBackend

    want = transformers_greedy(moe_copy, PROMPT, NEW_TOKENS)
    _edit_tensors(moe_copy, _fuse(4))
    ref = resolve_model(str(moe_copy), need_weights=True)
    experts = expert_placements(ref.spec, EXPERTS["random"])
    assert all(len(x.gpu) == 2 for x in experts)
    plan = placements(ref.spec, PLANS["random"])
    with load_hetero_model(ref, plan, FP32, StrictBackend(), progress=False, experts=experts) as loaded:
        assert _generate(loaded, PROMPT, NEW_TOKENS) == want


def test_a_fused_checkpoint_with_another_expert_count_is_refused(moe_copy):
    _edit_tensors(moe_copy, _fuse(3))
    with pytest.raises(ModelError, match=r"holds 3 experts, but config\.json says 4"):
        spec_from_folder(moe_copy)


def test_run_executes_a_moe_plan_and_plans_one_on_the_fly_with_cpu_moe(tiny_moe, tmp_path, monkeypatch):
    """`run --plan` on the CPU stand-in with half the experts on the GPU side, then `run
    --gpu-memory --cpu-moe` planned on the fly (CUDA faked by the stand-in): transformers'
    greedy tokens both times, the experts where the plan put them."""
    from hetegen_cli.core.devices import CpuBackend
    from hetegen_cli.models.loading.source import resolve_model
    from hetegen_cli.plan.document import RuntimeSettings, save_plan
    from hetegen_cli.plan.manual import manual_plan
    from hetegen_cli.profile.document import save_profile
    from hetegen_cli.run import builders
    from tests.cli.test_run import PROMPT, _reference_tokens, _run
    from tests.fakes import make_profile

    expected = _reference_tokens(tiny_moe)
    spec = resolve_model(str(tiny_moe), need_weights=True).spec
    runtime = RuntimeSettings(
        weights_dtype=spec.dtype, cpu_dtype_prefill="float32", cpu_dtype_decode="float32"
    )
    plan = manual_plan(
        spec,
        cpu_fraction_prefill=0.5,
        cpu_fraction_decode=0.25,
        runtime=runtime,
        experts_gpu={x.name: [1, 2] for x in spec.experts},
    )
    path = save_plan(plan, tmp_path / "plan.json")
    args = ("--model", str(tiny_moe), "--prompt", PROMPT, "-n", "6", "--json")
    result = _run(*args, "--plan", str(path), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["engine"] == "hetegen" and doc["token_ids"] == expected
    assert doc["plan"]["experts_on_gpu"] == 4 and doc["plan"]["experts_count"] == 8
    assert doc["engine_stats"]["experts_cpu"] > 0 and doc["engine_stats"]["experts_gpu"] > 0

    profile = tmp_path / "gpu-profile.json"
    save_profile(make_profile(gpu=True), profile)
    monkeypatch.setattr(builders, "cuda_available", lambda: True)
    monkeypatch.setattr(builders, "get_backend", lambda kind="auto": CpuBackend())
    result = _run(*args, "--gpu-memory", "3GiB", "--profile", str(profile), "--cpu-moe")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["plan"]["origin"] == "planned on the fly" and doc["token_ids"] == expected
    assert doc["plan"]["experts_on_gpu"] == 0 and doc["engine_stats"]["experts_gpu"] == 0
    split = doc["plan"]["expert_layers_split_in_decode"]
    assert (doc["engine_stats"]["experts_split"] > 0) == (split > 0)  # as planned (tiny experts: no split)
    result = _run(*args, "--gpu-memory", "3GiB", "--profile", str(profile), "--cpu-moe", "--no-expert-split")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["token_ids"] == expected and doc["plan"]["expert_layers_split_in_decode"] == 0
    assert doc["engine_stats"]["experts_split"] == 0 and doc["engine_stats"]["experts_cpu"] > 0
    assert_error(_run(*args, "--plan", str(path), "--cpu-moe"), "--plan and --cpu-moe", exit_code=2)
    assert_error(
        _run(*args, "--plan", str(path), "--no-expert-split"), "--plan and --no-expert-split", exit_code=2
    )


def test_a_quantized_moe_preset_prices_its_experts_quantized():
    """`--quant int4` on a MoE preset (shapes only): every routed expert's three matrices in
    int4 g32 (the bytes the planner places per expert), the label saying so."""
    from hetegen_cli.core.quant import weight_bytes
    from hetegen_cli.models.loading.source import resolve_model

    spec = resolve_model("qwen3-30b-a3b", need_weights=False, quant="int4").spec
    x = spec.experts[0]
    assert x.part_quant == (("int4", 32),) * 3 and x.quant_label == "int4-g32"
    assert x.expert_bytes == 3 * weight_bytes("int4", 768, 2048, 32)  # 0.625 bytes a parameter
    assert spec.quant == "int4" and spec.quant_label == spec.experts_quant_label == "int4-g32"
    float_spec = spec_from_config(presets.preset_config("qwen3-30b-a3b"), "q")
    assert spec.expert_weight_bytes * 3 < float_spec.expert_weight_bytes


def test_a_quantized_moe_model_runs_with_parts_the_kernel_refuses_kept_bfloat16(tiny_moe):
    """The tiny model's experts are 40 wide: int8 takes gate and up ([40, 64]) but not down
    (40 inputs, not a multiple of 16), which stays bfloat16; it runs plainly all the same."""
    result = cli("run", "--model", str(tiny_moe), "--prompt", "hi", "-n", "2", "--quant", "int8", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["engine"] == "plain" and doc["quant"] == "int8" and len(doc["token_ids"]) == 2


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize("plan_name", ["all_cpu", "mixed", "all_streamed"])
def test_cuda_moe_greedy_tokens_equal_transformers_on_the_gpu(tmp_path, arch, plan_name):
    """On a real GPU: CPU experts computed from host RAM while the GPU computes its own, the
    tokens transformers' generate gives on the same GPU (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hetegen_cli.core.devices import get_backend
    from hetegen_cli.engine.hetero_model import load_hetero_model
    from hetegen_cli.models.loading.source import resolve_model
    from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
    from tests.engine.test_strict_backend import FP32
    from tests.models.architecture.test_architectures import NEW_TOKENS, PROMPT

    backend = get_backend("cuda")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY[arch])).to(torch.float32)
    model.save_pretrained(tmp_path)
    build_tokenizer(tmp_path)
    ids = torch.tensor([PROMPT], device=backend.device)
    with torch.no_grad():
        want = model.to(backend.device).eval().generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    del model
    ref = resolve_model(str(tmp_path), need_weights=True)
    plan = placements(ref.spec, PLANS[plan_name])
    experts = expert_placements(ref.spec, EXPERTS[plan_name])
    with load_hetero_model(ref, plan, FP32, backend, progress=False, experts=experts) as hm, torch.no_grad():
        got = hm.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = hm.stats()
    assert got.tolist() == want.tolist()
    assert (stats["experts_cpu"] > 0) == (plan_name != "all_streamed")
