"""`hetegen plan --export llama.cpp`: the llama.cpp placements closest to a plan (plan.export).

The `-ot` patterns are checked against every tensor name of the model as llama.cpp's converter
writes them (the gguf package's table): they must select exactly the tensors the plan streams.
Python's `re` and llama.cpp's std::regex (ECMAScript) agree on what the patterns use: escaped
dots, groups, alternation and `^`.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.spec import spec_from_config
from hetegen_cli.models.formats.gguf_names import gguf_tensor_names, llama_cpp_arch
from hetegen_cli.models.shapes.presets import preset_config
from hetegen_cli.plan.costmodel.predict import CostInputs
from hetegen_cli.plan.document import ExpertsPlacement
from hetegen_cli.plan.export import cpu_tensor_patterns, expert_flags, layer_experts, llama_cpp_export
from hetegen_cli.plan.request import PlanRequest
from hetegen_cli.plan.solver import make_plan
from tests.fakes import make_profile
from tests.helpers import cli
from tests.mutations import property_settings

GiB = 2**30
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LAYERS = 40  # two-digit layer numbers: blk.1 must not select blk.11


def _selected(patterns: list[str], names: list[str]) -> set[str]:
    """The names (as `NAME.weight`) that llama.cpp would place by `patterns` (regex=CPU)."""
    regexes = [re.compile(p.removesuffix("=CPU")) for p in patterns]
    return {n for n in names if any(r.search(f"{n}.weight") for r in regexes)}


UNIVERSE = [f"blk.{i}.{k}" for i in range(LAYERS) for k in KINDS] + ["output", "token_embd"]


@property_settings(200)
@given(st.sets(st.sampled_from(UNIVERSE[:-1])))  # token_embd never streams
def test_patterns_select_exactly_the_streamed_tensors(chosen):
    patterns = cpu_tensor_patterns(sorted(chosen))
    assert _selected(patterns, UNIVERSE) == chosen
    assert all(p.endswith("=CPU") for p in patterns)


def test_patterns_group_layers_and_kinds():
    names = [f"blk.{i}.{k}" for i in (3, 4) for k in ("ffn_up", "ffn_down")] + ["blk.7.attn_q"]
    assert cpu_tensor_patterns(names) == [
        r"blk\.7\.attn_q\.weight=CPU",
        r"blk\.(3|4)\.(ffn_down|ffn_up)\.weight=CPU",
    ]


@pytest.mark.parametrize(
    "model_type, arch",
    [
        ("llama", "llama"),
        ("qwen3", "qwen3"),
        ("gemma3_text", "gemma3"),
        ("phi3", "phi3"),
        ("opt", None),
        ("qwen3_moe", "qwen3moe"),
        ("mixtral", "llama"),  # llama.cpp converts Mixtral as a llama model
    ],
)
def test_llama_cpp_architecture_names(model_type, arch):
    assert llama_cpp_arch(model_type) == arch


def test_a_model_llama_cpp_cannot_run_is_refused():
    with pytest.raises(ModelError, match=r"llama\.cpp has no 'opt' architecture") as info:
        gguf_tensor_names("opt", 4)
    assert info.value.hint


def _desktop(free_gib: float = 23) -> dict:
    """A made-up PCIe 4 desktop (docs/plan.md §5)."""
    return make_profile(
        cpu_dtypes={"bfloat16": 56e9, "float32": 60e9},
        best="bfloat16",
        cpu_call_s=30e-6,
        cpu_flops=0.8e12,
        pcie_bw=25e9,
        pcie_copy_s=10e-6,
        hbm=900e9,
        gpu_flops=150e12,
        free=int(free_gib * GiB),
        total=24 * GiB,
        ram_available=120 * GiB,
    )


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "qwen3-8b"])
def test_export_of_a_split_plan(preset):
    spec = spec_from_config(preset_config(preset), preset)
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    profile = _desktop()
    plan = make_plan(spec, profile, req)
    names = gguf_tensor_names(spec.architecture, spec.num_layers)
    exported = llama_cpp_export(plan, spec, req, CostInputs.of(profile), names)
    tensors, layers = exported.options
    assert tensors.kind == "tensors" and layers.kind == "layers"
    # -ngl all layers + the output layer, then exactly the streamed linears back to the CPU
    assert tensors.flags[:2] == ("-ngl", str(spec.num_layers + 1))
    patterns = [tensors.flags[i + 1] for i, f in enumerate(tensors.flags) if f == "-ot"]
    every = [names(lin.name) for lin in spec.linears]
    streamed = {names(p.name) for p in plan.placements if not p.resident}
    assert streamed and _selected(patterns, every) == streamed
    assert layers.flags[:2] == ("-ngl", str(plan.predictions.layer_split.gpu_layers))
    assert tensors.flags[-4:] == ("-t", str(plan.runtime.cpu_threads), "-c", "576")
    # the plan splits the streamed linears' rows: never slower than computing them whole on the CPU
    own = exported.hetegen_decode_tokens_per_s
    assert own == plan.predictions.hetegen.decode_tokens_per_s
    assert own >= tensors.decode_tokens_per_s > 0
    assert layers.decode_tokens_per_s == plan.predictions.layer_split.decode_tokens_per_s


def test_export_of_an_all_cpu_plan():
    spec = spec_from_config(preset_config("llama-3.1-8b"), "llama-3.1-8b")
    req = PlanRequest(prompt_len=64, max_new_tokens=8, gpu_budget_bytes=0)
    profile = _desktop()
    plan = make_plan(spec, profile, req)
    exported = llama_cpp_export(plan, spec, req, CostInputs.of(profile), lambda name: None)
    (only,) = exported.options
    assert only.kind == "cpu" and only.flags[:2] == ("-ngl", "0")
    assert only.decode_tokens_per_s == plan.predictions.cpu_only.decode_tokens_per_s


def test_plan_export_on_the_command_line(tmp_path):
    profile = tmp_path / "desktop.json"
    profile.write_text(json.dumps(_desktop()))
    args = ["plan", "--model", "llama-3.1-8b", "--profile", str(profile), "--gpu-memory", "8GiB"]
    result = cli(*args, "--export", "llama.cpp", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["tool"] == "llama.cpp" and [o["kind"] for o in doc["options"]] == ["tensors", "layers"]
    assert doc["options"][0]["command"].startswith("-ngl 33 -ot 'blk")
    text = cli(*args, "--export", "llama.cpp")
    assert text.exit_code == 0 and "-ngl 33" in text.stdout and "hetegen's plan" in text.stdout
    bad = cli(*args, "--export", "vllm")
    assert bad.exit_code == 2 and "unknown --export 'vllm'" in bad.stderr and "Hint:" in bad.stderr
    opt = cli("plan", "--model", "opt-1.3b", "--profile", str(profile), "--export", "llama.cpp")
    assert opt.exit_code == 1 and "llama.cpp has no 'opt' architecture" in opt.stderr
    assert "Traceback" not in opt.stderr and opt.stdout == ""


# --- mixture-of-experts plans: experts rounded to whole layers ----------------------------------

MOE_LAYERS = 40
MOE_NAMES = gguf_tensor_names("qwen3_moe", MOE_LAYERS)
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MOE_UNIVERSE = [f"blk.{i}.{k}" for i in range(MOE_LAYERS) for k in (*KINDS[:4], *EXPS, "ffn_gate_inp")]


def _layers_of(gpu_layers: set[int], num_experts: int = 4) -> tuple[ExpertsPlacement, ...]:
    return tuple(
        ExpertsPlacement(
            f"model.layers.{i}.mlp.experts",
            i,
            num_experts,
            tuple(range(num_experts)) if i in gpu_layers else (),
        )
        for i in range(MOE_LAYERS)
    )


@property_settings(200)
@given(st.sets(st.integers(0, MOE_LAYERS - 1)))
def test_moe_flags_keep_exactly_the_cpu_layers_experts_on_the_cpu(gpu_layers):
    flags, names = expert_flags(_layers_of(gpu_layers), MOE_NAMES)
    cpu = set(range(MOE_LAYERS)) - gpu_layers
    want = {f"blk.{i}.{k}" for i in cpu for k in EXPS}
    if not cpu:
        assert flags == () and names == []
    elif not gpu_layers:
        assert flags == ("--cpu-moe",) and names == []
    elif cpu == set(range(len(cpu))):
        assert flags == ("--n-cpu-moe", str(len(cpu))) and names == []
    else:
        assert flags == () and _selected(cpu_tensor_patterns(names), MOE_UNIVERSE) == want


@pytest.fixture(scope="module")
def qwen_moe():
    return spec_from_config(preset_config("qwen3-30b-a3b"), "qwen3-30b-a3b")


@property_settings(60)
@given(st.lists(st.integers(0, 128), min_size=48, max_size=48), st.integers(0, 48 * 128))
def test_rounding_to_layers_fills_the_experts_memory_with_whole_layers(qwen_moe_plan, counts, room):
    spec, plan = qwen_moe_plan
    size = spec.experts[0].expert_bytes
    experts = tuple(ExpertsPlacement.of(x, range(c)) for x, c in zip(spec.experts, counts, strict=True))
    gpu = plan.memory.gpu.model_copy(update={"resident_expert_bytes": room * size})
    memory = plan.memory.model_copy(update={"gpu": gpu})
    budget = plan.budget.model_copy(update={"gpu_unused_bytes": 0})
    rounded, to_cpu, to_gpu = layer_experts(
        replace(plan, experts=experts, memory=memory, budget=budget), spec
    )
    whole = [x for x in rounded if x.gpu]
    assert all(len(x.gpu) == x.num_experts for x in whole)  # whole layers or nothing
    assert all(counts[x.layer_index] > 0 for x in whole)  # only layers the plan gave experts
    assert len(whole) * 128 <= room  # within the plan's experts memory
    left_out = [c for x, c in zip(rounded, counts, strict=True) if not x.gpu and c]
    assert not left_out or room - len(whole) * 128 < 128  # no other layer would fit
    assert to_cpu == sum(left_out) and to_gpu == sum(128 - counts[x.layer_index] for x in whole)


@pytest.fixture(scope="module")
def qwen_moe_plan(qwen_moe):
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=8 * GiB)
    return qwen_moe, make_plan(qwen_moe, _desktop(), req)


@pytest.mark.parametrize(
    "gib, over, flags",
    [
        (8, {}, ("-ot",)),  # uniform: layers 0-2 whole, a part of layer 3 back to the CPU
        (8, {"cpu_moe": True}, ("--cpu-moe",)),
        (24, {"n_cpu_moe": 40}, ("--n-cpu-moe", "40")),
    ],
)
def test_export_of_a_moe_plan(qwen_moe, gib, over, flags):
    req = PlanRequest(prompt_len=512, max_new_tokens=64, gpu_budget_bytes=gib * GiB, **over)
    profile = _desktop()
    plan = make_plan(qwen_moe, profile, req)
    names = gguf_tensor_names(qwen_moe.architecture, qwen_moe.num_layers)
    tensors, layers = llama_cpp_export(plan, qwen_moe, req, CostInputs.of(profile), names).options
    assert tensors.flags[:2] == ("-ngl", "49") and tensors.flags[2 : 2 + len(flags)] == flags
    assert layers.kind == "layers"
    rounded, to_cpu, _ = layer_experts(plan, qwen_moe)
    if flags == ("-ot",):
        cpu = {x.layer_index for x in rounded if not x.gpu}
        assert cpu == set(range(3, 48)) and to_cpu == sum(len(x.gpu) for x in plan.experts) - 3 * 128
        every = [f"blk.{i}.{k}" for i in range(48) for k in (*KINDS[:4], *EXPS)]
        patterns = [tensors.flags[i + 1] for i, f in enumerate(tensors.flags) if f == "-ot"]
        assert _selected(patterns, every) == {f"blk.{i}.{k}" for i in cpu for k in EXPS}
        (note,) = tensors.notes
        assert f"{to_cpu} experts moved to the CPU, 0 to the GPU" in note
        # moving experts to the CPU never predicts faster than the plan
        assert tensors.decode_tokens_per_s < plan.predictions.hetegen.decode_tokens_per_s
    else:  # the plan's placement is already whole layers: no note, the prediction of the
        # same plan without its decode split of the CPU experts (llama.cpp has none)
        assert tensors.notes == () and to_cpu == 0
        assert any(x.split_units for x in plan.experts)
        whole = make_plan(qwen_moe, profile, replace(req, expert_split=False))
        assert tensors.decode_tokens_per_s == pytest.approx(whole.predictions.hetegen.decode_tokens_per_s)
        assert tensors.decode_tokens_per_s < plan.predictions.hetegen.decode_tokens_per_s


def test_moe_export_on_the_command_line(tmp_path):
    profile = tmp_path / "desktop.json"
    profile.write_text(json.dumps(_desktop()))
    args = ["plan", "--model", "qwen3-30b-a3b", "--profile", str(profile), "--gpu-memory", "8GiB"]
    doc = json.loads(cli(*args, "--export", "llama.cpp", "--json").stdout)
    tensors = doc["options"][0]
    assert "_exps" in tensors["command"] and "rounded to whole layers" in tensors["notes"][0]
    text = cli(*args, "--cpu-moe", "--export", "llama.cpp")
    assert text.exit_code == 0 and "-ngl 49 --cpu-moe -t" in text.stdout
