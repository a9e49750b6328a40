"""Mixture-of-experts GGUF files (models.formats.gguf_quant, gguf_config; written by
models.formats.gguf_write / gguf_write_moe): a tiny Qwen3-MoE, Qwen2-MoE, Mixtral (a llama
file with experts) and OLMoE file converts without a float copy, expert by expert, each
expert's part in the format its GGUF type maps to (Q4_0/Q4_1 -> int4 exactly, Q8_0 -> int8,
Q4_K -> int4 within float16 rounding); the converted model computes the file's values (against
transformers on gguf's own dequantization, routing shared) and runs through the engine as its
plain quantized model; a file missing an expert tensor is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetegen_cli.core import paths
from hetegen_cli.core.devices import CpuBackend
from hetegen_cli.core.errors import ModelError
from hetegen_cli.engine.hetero_model import load_hetero_model
from hetegen_cli.models.formats.checkpoint import CheckpointReader
from hetegen_cli.models.formats.gguf_write import tensor_plan, write_llama_gguf
from hetegen_cli.models.formats.quant import QuantWeight, quantize
from hetegen_cli.models.formats.quant_experts import read_stored_expert
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.models.shapes.quantfile import read_quantization
from hetegen_cli.plan.document import RuntimeSettings
from tests.engine.conftest import EXPERTS, PLANS, expert_placements, placements
from tests.gguf_files import copy_gguf
from tests.helpers import ACTIVATIONS, assert_error, run_quick
from tests.models.formats.test_quant_experts import routing

_BASE = dict(
    vocab_size=49152,  # the default model's tokenizer, copied into every synthetic file
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
#: arch -> (config, type of the linears, type of the experts)
FILES = {
    "qwen3_moe": (
        dict(
            _BASE,
            model_type="qwen3_moe",
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            norm_topk_prob=True,
        ),
        "Q4_0",
        "Q4_1",
    ),
    "qwen2_moe": (
        dict(
            _BASE,
            model_type="qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
        ),
        "Q4_1",
        "Q8_0",
    ),
    "mixtral": (
        dict(_BASE, model_type="mixtral", intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
        "Q4_0",
        "Q4_0",
    ),
    "olmoe": (
        dict(_BASE, model_type="olmoe", intermediate_size=64, num_experts=4, num_experts_per_tok=2),
        "Q8_0",
        "Q8_0",
    ),
}
PROMPT = [[5, 17, 42, 99, 7, 250]]
STD = 0.1


@pytest.fixture(scope="module")
def tokenizer():
    from hetegen_cli.models.formats.gguf import default_gguf_path

    try:
        return default_gguf_path()
    except ModelError as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc.message}")


@pytest.fixture(scope="module", params=sorted(FILES))
def moe_gguf(request, tokenizer, tmp_path_factory):
    """(arch, path of its tiny MoE GGUF, the converted ModelRef)."""
    arch = request.param
    config, qtype, expert_qtype = FILES[arch]
    root = tmp_path_factory.mktemp(f"gguf-{arch}")
    path = write_llama_gguf(
        config, root / f"{arch}.gguf", qtype, std=STD, tokenizer_gguf=tokenizer, expert_qtype=expert_qtype
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HETEGEN_HOME", str(root / "home"))
        ref = resolve_model(str(path), need_weights=True, quant="auto")
    return arch, path, ref


def gguf_values(path, config, qtype, expert_qtype) -> dict[str, torch.Tensor]:
    """The file's tensors by transformers name, float32, as the gguf package dequantizes
    them (apart from hetegen's converter): fused experts put together, q/k rows of a llama
    file put back in transformers' order."""
    from gguf import GGUFReader, quants

    from hetegen_cli.models.formats.gguf_quant import _row_order

    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    values: dict[str, list] = {}
    for t in tensor_plan(config, qtype, expert_qtype):
        raw = stored[t.gguf_name]
        v = torch.from_numpy(
            np.array(quants.dequantize(np.array(raw.data), raw.tensor_type), dtype=np.float32)
        )
        v = v.reshape(t.shape)
        if t.permute_heads is not None:
            v = v[_row_order(v.shape[0], t.permute_heads)]
        values.setdefault(t.hf_name, []).append(v)
    out = {}
    for name, parts in values.items():
        out[name] = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]
        if name.endswith("shared_expert_gate.weight"):
            out[name] = out[name].reshape(1, -1)
    return out


def test_the_file_lays_out_experts_as_llama_cpp_does(moe_gguf):
    from gguf import GGUFReader

    arch, path, _ = moe_gguf
    config, qtype, expert_qtype = FILES[arch]
    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    gguf_arch = field("general.architecture")
    assert gguf_arch == {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}.get(arch, arch)
    assert field(f"{gguf_arch}.expert_count") == 4 and field(f"{gguf_arch}.expert_used_count") == 2
    tensors = {t.name: t for t in reader.tensors}
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    for part, dims in (("gate", [64, width, 4]), ("up", [64, width, 4]), ("down", [width, 64, 4])):
        t = tensors[f"blk.1.ffn_{part}_exps.weight"]
        assert t.tensor_type.name == expert_qtype and [int(d) for d in t.shape] == dims
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == qtype


def test_each_expert_is_converted_from_its_blocks(moe_gguf):
    """Every expert's part equals gguf's dequantization of its rows of the file: exactly from
    Q4_0/Q4_1 (int4, the blocks' own scales), within half an int8 step from Q8_0."""
    arch, path, ref = moe_gguf
    config, qtype, expert_qtype = FILES[arch]
    values = gguf_values(path, config, qtype, expert_qtype)
    doc = read_quantization(ref.path)
    fmt = "int8" if expert_qtype == "Q8_0" else "int4"
    assert doc["schema_version"] == 3 and doc["experts"] == {x.name: [fmt] * 3 for x in ref.spec.experts}
    source = doc["source"]
    assert source["gguf_expert_types"] == {expert_qtype: 6}
    outcome = "requantized" if fmt == "int8" else "exact"
    assert source[f"expert_parts_{outcome}"] == 2 * 4 * 3
    assert ref.spec.experts_quant_label == ("int8" if fmt == "int8" else "int4-g32")
    with CheckpointReader(ref.path) as reader:
        for x in ref.spec.experts:
            i = x.intermediate_size
            for e in range(x.num_experts):
                parts = read_stored_expert(reader, x, e, torch.float32)
                want = {"gate": values[x.gate_up_name][e, :i], "up": values[x.gate_up_name][e, i:]}
                want["down"] = values[x.down_name][e]
                for part, w in parts.items():
                    assert isinstance(w, QuantWeight) and w.format == fmt
                    got = w.dequantize()
                    if fmt == "int4":
                        assert torch.equal(got, want[part]), (x.name, e, part)
                    else:
                        step = want[part].abs().amax(dim=1, keepdim=True) / 127
                        assert ((got - want[part]).abs() <= step / 2 + 1e-7).all(), (x.name, e, part)


def test_the_converted_model_computes_the_files_values(moe_gguf):
    """The plain quantized model against transformers in float32 holding gguf's own
    dequantization of the file (the LM head int8 as the plain model holds it), the plain
    model's routing shared: logits within 5 % of the largest. A wrong expert order, gate and
    up swapped or q/k rows left permuted would be far off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, path, ref = moe_gguf
    config, qtype, expert_qtype = FILES[arch]
    values = gguf_values(path, config, qtype, expert_qtype)
    values["lm_head.weight"] = quantize(values["lm_head.weight"], "int8").dequantize()
    reference = (
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ref.path)).to(torch.float32).eval()
    )
    missing, unexpected = reference.load_state_dict(values, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    names = [x.name for x in ref.spec.experts]
    chosen: dict = {}
    ids = torch.tensor(PROMPT)
    with load_quantized(ref) as plain, torch.no_grad():
        with routing(plain.model, names, chosen):
            got = plain.model(ids).logits.float()
        with routing(reference, names, {}, force=chosen):
            want = reference(ids).logits
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


def test_the_engine_runs_the_converted_model_as_its_plain_model(moe_gguf):
    """All-CPU plan: the plain quantized model's tokens and logits bit for bit; half the
    experts on the GPU side: both sides compute."""
    _, _, ref = moe_gguf
    ids = torch.tensor(PROMPT)
    runtime = RuntimeSettings(weights_dtype=ACTIVATIONS)  # the plain model's, for bit-for-bit
    with load_quantized(ref) as plain, torch.no_grad():
        want = plain.model.generate(ids, max_new_tokens=6, do_sample=False)
        logits = plain.model(ids).logits
    for experts in ("all_cpu", "mixed"):
        lin = placements(ref.spec, PLANS["all_cpu"])
        with (
            load_hetero_model(
                ref,
                lin,
                runtime,
                CpuBackend(),
                progress=False,
                experts=expert_placements(ref.spec, EXPERTS[experts]),
            ) as loaded,
            torch.no_grad(),
        ):
            got = loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
            stats = loaded.stats()
            if experts == "all_cpu":
                assert torch.equal(loaded.model(ids).logits, logits) and got.tolist() == want.tolist()
            else:
                assert stats["experts_gpu"] > 0 and stats["experts_cpu"] > 0


def test_a_file_missing_an_expert_tensor_is_refused_before_writing(moe_gguf, tmp_path):
    arch, path, _ = moe_gguf
    if arch != "qwen3_moe":  # the check reads the layout's tensor names, whatever the architecture
        pytest.skip("architecture-independent: checked on qwen3_moe (4 s each)")
    broken = copy_gguf(path, tmp_path / "broken.gguf", {}, drop=("blk.1.ffn_up_exps.weight",))
    with pytest.raises(
        ModelError, match=r"lacks the tensor blk\.1\.ffn_up_exps\.weight \(the up weights of the 4 "
    ):
        resolve_model(str(broken), need_weights=True, quant="auto")
    assert not [p for p in paths.models_dir().glob("*broken*")]
    assert_error(run_quick("--model", str(broken)), "blk.1.ffn_up_exps.weight", "incomplete")


def test_int8_on_request_re_quantizes_every_expert(moe_gguf, tmp_path, monkeypatch):
    arch, path, _ = moe_gguf
    if FILES[arch][2] == "Q8_0":
        pytest.skip("the experts are int8 already")
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "home"))
    ref = resolve_model(str(path), need_weights=True, quant="int8")
    doc = read_quantization(ref.path)
    assert doc["format"] == "int8" and set(map(tuple, doc["experts"].values())) == {("int8",) * 3}
    assert doc["source"]["expert_parts_requantized"] == 24


def test_k_quant_experts_load_as_int4(tokenizer, tmp_path, monkeypatch):
    """Q4_K experts (256-input super-blocks) map onto int4 groups of 32 within float16
    rounding of each group's scale and offset, as dense Q4_K linears do; Q6_K would be int8."""
    from gguf import GGUFReader, quants

    config = dict(
        FILES["qwen3_moe"][0], hidden_size=256, moe_intermediate_size=256, num_hidden_layers=1, head_dim=64
    )
    path = write_llama_gguf(
        config, tmp_path / "kq.gguf", "Q8_0", std=STD, tokenizer_gguf=tokenizer, expert_qtype="Q4_K"
    )
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "home"))
    ref = resolve_model(str(path), need_weights=True, quant="auto")
    doc = read_quantization(ref.path)
    assert doc["experts"] == {"model.layers.0.mlp.experts": ["int4"] * 3}
    assert doc["source"]["expert_parts_float16_rounded"] == 4 * 3
    raw = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_down_exps.weight")
    down = torch.from_numpy(quants.dequantize(np.array(raw.data), raw.tensor_type)).reshape(4, 256, 256)
    with CheckpointReader(ref.path) as reader:
        got = read_stored_expert(reader, ref.spec.experts[0], 3, torch.float32)["down"]
    scale = got.scale.float().repeat_interleave(32, dim=1)
    low = got.min.float().repeat_interleave(32, dim=1)
    bound = 2.0**-11 * (15 * scale.abs() + low.abs()) + 1e-7
    assert ((got.dequantize() - down[3]).abs() <= bound).all()


def test_a_float32_copy_of_a_moe_file_is_refused_with_a_hint(moe_gguf):
    """transformers' GGUF loader (the --quant none conversion) fuses Qwen's experts and does
    not know Mixtral's or OLMoE's: hetegen converts MoE files itself, quantized."""
    _, path, _ = moe_gguf
    assert_error(run_quick("--model", str(path), "--quant", "none"), "mixture-of-experts", "--quant auto")
