"""Quantized weights: the formats' numerics, GGUF blocks, the packed kernels, quantized folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetegen_cli.core import quant
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.quant import QuantLinear, from_gguf_blocks, pack_nibbles, quantize
from hetegen_cli.models.formats.quantized import ensure_quantized
from hetegen_cli.models.loading.quantized_loader import load_quantized
from hetegen_cli.models.loading.source import resolve_model
from hetegen_cli.models.shapes.quantfile import read_quantization


def test_int8_is_per_row_symmetric_within_half_a_step():
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]
    q = quantize(w, "int8")
    assert q.q.dtype == torch.int8 and q.scale.shape == (48,) and q.scale.dtype == torch.float16
    step = q.scale.float()[:, None]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q.nbytes == quant.weight_bytes("int8", 48, 64)


@pytest.mark.parametrize("group", quant.INT4_GROUP_SIZES)
def test_int4_groups_within_half_a_step(group):
    w = torch.randn(32, 256)
    q = quantize(w, "int4", group)
    assert q.q.shape == (32, 128) and q.scale.shape == q.min.shape == (32, 256 // group)
    step = q.scale.float().repeat_interleave(group, dim=1)
    assert ((q.dequantize() - w).abs() <= step / 2 + 2e-3).all()  # + float16 rounding of min
    assert q.nbytes == quant.weight_bytes("int4", 32, 256, group)
    assert torch.equal(pack_nibbles(q.int4_values()), q.q)  # the layout round-trips


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_map_onto_hetegen_formats(kind):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 96)).astype(np.float32)
    gtype = getattr(GGMLQuantizationType, kind)
    raw = torch.from_numpy(quants.quantize(w, gtype).copy())  # uint8 [16, bytes per row]
    exact = torch.from_numpy(quants.dequantize(raw.numpy(), gtype)).reshape(16, 96)
    got = from_gguf_blocks(kind, raw, 16, 96)
    if kind == "Q8_0":  # re-quantized per row: within half an int8 step of the exact values
        assert got.format == "int8"
        assert ((got.dequantize() - exact).abs() <= got.scale.float()[:, None] / 2 + 1e-6).all()
    else:  # the same values exactly
        assert got.format == "int4" and got.group_size == 32
        assert torch.equal(got.dequantize(), exact)


def test_permuting_rows_moves_whole_quantized_rows():
    q = quantize(torch.randn(32, 64), "int4")
    order = torch.randperm(32)
    assert torch.equal(q.permute_rows(order).dequantize(), q.dequantize()[order])


@pytest.mark.parametrize("fmt", quant.QUANT_FORMATS)
@pytest.mark.parametrize("shape", [(64, 64), (192, 576), (576, 1536)])
def test_quant_linear_matches_the_dequantized_weight(fmt, shape):
    w = torch.randn(*shape)
    bias = torch.randn(shape[0])
    qw = quantize(w, fmt)
    lin = QuantLinear(qw, bias)
    x = torch.randn(3, 5, shape[1])
    want = F.linear(x, qw.dequantize(), bias)
    got = lin(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    # bfloat16 activations: ~3 significant digits
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("fmt", quant.QUANT_FORMATS)
def test_quant_linear_without_bias_takes_2d_and_3d_inputs_alike(fmt):
    """forward skips the reshapes for a 2-D input and reads the bias where it is registered
    (None here): the same numbers either way."""
    lin = QuantLinear(quantize(torch.randn(64, 64), fmt))
    x = torch.randn(2, 3, 64)
    assert lin.bias is None and "bias" not in lin.state_dict()
    assert torch.equal(lin(x), lin(x.reshape(6, 64)).reshape(2, 3, 64))
    assert lin(x.reshape(6, 64)).shape == (6, 64)


def test_kernel_shape_rules():
    assert quant.kernel_takes("int8", 7, 48) and not quant.kernel_takes("int8", 7, 24)
    assert quant.kernel_takes("int4", 64, 64) and not quant.kernel_takes("int4", 136, 64)
    assert not quant.kernel_takes("int4", 64, 136)  # not a multiple of the group
    with pytest.raises(ValueError, match="cannot take"):
        QuantLinear(quantize(torch.randn(8, 24), "int8"))


def test_a_wrong_kernel_result_is_refused(monkeypatch):
    from hetegen_cli.models.formats import quant as mq

    monkeypatch.setattr(mq, "_CHECKED", set())  # a shape checked by an earlier test is not rechecked
    monkeypatch.setattr(QuantLinear, "matmul", lambda self, x: torch.zeros(x.shape[0], self.out_features))
    with pytest.raises(ModelError, match="wrong results"):
        QuantLinear(quantize(torch.randn(32, 64), "int8"))


# --- quantized folders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_int4(tiny_llama_dir, tmp_path_factory):
    ref = resolve_model(str(tiny_llama_dir), need_weights=True)
    return ref, ensure_quantized(ref, "int4", 32, tmp_path_factory.mktemp("q") / "tiny-int4")


def test_quantized_folder_holds_what_the_kernels_take(tiny_int4):
    ref, folder = tiny_int4
    doc = read_quantization(folder)
    assert doc["format"] == "int4" and doc["group_size"] == 32
    # the tiny LLaMA's 136-wide MLP does not fit the int4 kernel: those stay bfloat16
    assert {n.rsplit(".", 1)[1] for n in doc["linears"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {n.rsplit(".", 1)[1] for n in doc["kept_float"]} == {"gate_proj", "up_proj", "down_proj"}
    qref = resolve_model(str(folder), need_weights=True, quant="auto")
    assert qref.spec.quant == "int4" and qref.spec.dtype == "bfloat16"
    assert qref.spec.parameter_count == ref.spec.parameter_count
    assert qref.spec.total_weight_bytes < ref.spec.total_weight_bytes


def test_quantized_model_generates_like_its_dequantized_weights(tiny_int4):
    _, folder = tiny_int4
    qref = resolve_model(str(folder), need_weights=True, quant="auto")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with load_quantized(qref) as lm, torch.inference_mode():
        assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == 8 + 1  # + the head
        head = lm.model.get_output_embeddings()
        assert isinstance(head, QuantLinear) and head.format == "int8"
        got = lm.model(ids).logits.float()
        # the same model with each QuantLinear replaced by its dequantized weight (float32)
        from hetegen_cli.models.formats.checkpoint import CheckpointReader
        from hetegen_cli.models.formats.quantized import read_quant_weight

        doc = read_quantization(folder)
        with CheckpointReader(folder) as reader:
            for name in doc["linears"]:
                w = read_quant_weight(reader, name, doc).dequantize()
                owner, _, attr = name.rpartition(".")
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                linear.weight.data = w
                setattr(lm.model.get_submodule(owner), attr, _InDtype(linear))
        want = lm.model(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


class _InDtype(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.float()).to(x.dtype)


def test_quantizing_twice_reuses_the_copy_and_formats_do_not_mix(tiny_int4):
    ref, folder = tiny_int4
    assert ensure_quantized(ref, "int4", 32, folder) == folder
    qref = resolve_model(str(folder), need_weights=True, quant="auto")
    assert ensure_quantized(qref, "int4", 32) == folder
    with pytest.raises(ModelError, match="already quantized"):
        ensure_quantized(qref, "int8", 32)
    with pytest.raises(ModelError, match="stored quantized"):
        resolve_model(str(folder), need_weights=True, quant="none")


def test_a_damaged_quantized_folder_is_refused(tiny_int4, tmp_path):
    import shutil

    _, folder = tiny_int4
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    doc = json.loads((copy / "quantization.json").read_text())
    doc["linears"].append("model.layers.0.mlp.up_proj")
    (copy / "quantization.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"lacks model\.layers\.0\.mlp\.up_proj\.weight\.q"):
        resolve_model(str(copy), need_weights=True, quant="auto")
    (copy / "quantization.json").write_text('{"kind": "something else"}')
    with pytest.raises(ModelError, match="not a hetegen quantization document"):
        resolve_model(str(copy), need_weights=True, quant="auto")


def test_presets_quantize_as_shapes(tmp_path):
    ref = resolve_model("llama-2-7b", need_weights=False, quant="int4")
    assert ref.path is None and ref.spec.quant == "int4" and ref.spec.dtype == "bfloat16"
    dense = resolve_model("llama-2-7b", need_weights=False)
    ratio = sum(lin.weight_bytes for lin in ref.spec.linears) / sum(
        lin.weight_bytes for lin in dense.spec.linears
    )
    assert ratio == pytest.approx(0.625 / 2, rel=1e-3)  # int4 g32 against float16


@pytest.mark.slow
def test_the_default_gguf_converts_to_int4_exactly():
    """The default model's Q4_1 linears, straight from the GGUF, hold exactly the values
    transformers' own GGUF loader dequantizes (q/k rows un-permuted alike)."""
    from hetegen_cli.models.formats.checkpoint import CheckpointReader
    from hetegen_cli.models.formats.quantized import read_quant_weight

    try:
        dense = resolve_model(None, need_weights=True)
        q = resolve_model(None, need_weights=True, quant="auto")
    except ModelError as exc:
        pytest.skip(f"default model unavailable: {exc.message}")
    doc = read_quantization(q.path)
    assert q.spec.quant == "int4" and doc["source"]["linears_exact"] == 210
    with CheckpointReader(dense.path) as a, CheckpointReader(q.path) as b:
        for name in (
            "model.layers.0.self_attn.q_proj",
            "model.layers.7.self_attn.k_proj",
            "model.layers.29.mlp.down_proj",
        ):
            want = a.read(a.key_for(f"{name}.weight"), torch.float32, torch.device("cpu"))
            assert torch.equal(read_quant_weight(b, name, doc).dequantize(), want)


def test_cli_quantize_writes_the_folder_run_uses(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from hetegen_cli.cli.app import app

    out = tmp_path / "tiny-int8"
    r = CliRunner().invoke(
        app, ["quantize", "--model", str(tiny_llama_dir), "--quant", "int8", "--output", str(out), "--json"]
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "hetegen.quantized" and doc["format"] == "int8" and doc["folder"] == str(out)
    assert read_quantization(out)["format"] == "int8" and doc["bytes"] > 0
    run = CliRunner().invoke(app, ["run", "--model", str(out), "--prompt", "hello", "-n", "3", "--json"])
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["quant"] == "int8"
    bad = CliRunner().invoke(
        app, ["quantize", "--model", str(tiny_llama_dir), "--quant", "int4", "--group-size", "48"]
    )
    assert bad.exit_code == 2 and "--group-size 48" in bad.stderr


def test_a_wrong_kernel_is_refused_once_per_shape_not_per_linear(monkeypatch):
    """The self-check runs once per (format, shape, group) in a process: a broken kernel is
    still refused, and a second linear of a checked shape is not multiplied again."""
    from hetegen_cli.models.formats import quant as mq

    monkeypatch.setattr(mq, "_CHECKED", set())
    calls = []
    real = QuantLinear.matmul

    def counting(self, x2):
        calls.append(self.out_features)
        return real(self, x2)

    monkeypatch.setattr(QuantLinear, "matmul", counting)
    QuantLinear(quantize(torch.randn(64, 64), "int4"))
    QuantLinear(quantize(torch.randn(64, 64), "int4"))  # the same shape: checked already
    QuantLinear(quantize(torch.randn(32, 64), "int4"))
    assert calls == [64, 32]
    monkeypatch.setattr(QuantLinear, "matmul", lambda self, x2: -real(self, x2))
    with pytest.raises(ModelError, match="wrong results"):
        QuantLinear(quantize(torch.randn(48, 64), "int4"))
