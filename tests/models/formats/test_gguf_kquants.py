"""GGUF K-quant files converted without a float copy (models.formats.gguf_quant): a
Q4_K_M-layout file written by models.formats.gguf_write (Q4_K for most linears, Q6_K for
attn_v and ffn_down where llama-quantize puts it) loads each linear in its own format, int4
or int8, each against the `gguf` package's dequantization of the file; types with no mapping
are refused before any conversion, or copied to bfloat16 with --allow-float-copy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetegen_cli.core import paths
from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.formats.gguf_write import use_more_bits, write_llama_gguf
from hetegen_cli.models.loading.source import resolve_model
from tests.gguf_files import copy_gguf, random_blocks
from tests.helpers import ACTIVATIONS, assert_error, run_quick
from tests.tiny_models import llama_from_values

#: the tiny GGUF's shapes (tests.tiny_models.TINY_GGUF_CONFIG) widened to K-quant super-blocks
#: of 256 inputs; 2 layers: use_more_bits(1, 2) puts layer 1's attn_v and ffn_down in Q6_K
KQ_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
U = 2.0**-11  # float16's unit roundoff
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
GGUF_NAMES |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _gguf_name(linear: str) -> str:
    parts = linear.split(".")  # model.layers.N.self_attn.q_proj
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}.weight"


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Conversions of this module's files go to a home of their own, not the shared cache of
    converted models (tests/conftest.py), whose other tests expect no gguf-* folders."""
    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "private-home"))


@pytest.fixture(scope="module")
def kq_gguf(tmp_path_factory):
    """(path of a tiny Q4_K_M GGUF, its values as gguf dequantizes them by transformers name,
    in transformers' row order)."""
    from gguf import GGUFReader, quants

    from hetegen_cli.models.formats.gguf import default_gguf_path
    from hetegen_cli.models.formats.gguf_quant import _row_order

    try:
        tokenizer = default_gguf_path()
    except ModelError as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc.message}")
    path = write_llama_gguf(
        KQ_CONFIG,
        tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf",
        "Q4_K_M",
        seed=4,
        std=0.1,
        tokenizer_gguf=tokenizer,
    )
    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    values = {}
    for i in range(2):
        for mod, g in GGUF_NAMES.items():
            t = stored[f"blk.{i}.{g}.weight"]
            v = torch.from_numpy(quants.dequantize(np.array(t.data), t.tensor_type)).reshape(
                int(t.shape[1]), int(t.shape[0])
            )
            if mod in ("q_proj", "k_proj"):
                v = v[_row_order(v.shape[0], 4 if mod == "q_proj" else 2)]
            prefix = "mlp" if "ffn" in g else "self_attn"
            values[f"model.layers.{i}.{prefix}.{mod}.weight"] = v
        for norm, g in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            values[f"model.layers.{i}.{norm}.weight"] = torch.from_numpy(
                np.array(stored[f"blk.{i}.{g}.weight"].data)
            )
    embed = stored["token_embd.weight"]
    values["model.embed_tokens.weight"] = torch.from_numpy(
        quants.dequantize(np.array(embed.data), embed.tensor_type)
    ).reshape(49152, 256)
    values["model.norm.weight"] = torch.from_numpy(np.array(stored["output_norm.weight"].data))
    return path, values


@pytest.fixture(scope="module")
def kq_ref(kq_gguf, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HETEGEN_HOME", str(tmp_path_factory.mktemp("kq-home")))
        return resolve_model(str(kq_gguf[0]), need_weights=True, quant="auto")


def test_the_writer_lays_out_q4_k_m_as_llama_quantize_does(kq_gguf):
    from gguf import GGUFReader

    reader = GGUFReader(str(kq_gguf[0]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == 15  # MOSTLY_Q4_K_M
    assert types["token_embd.weight"] == "Q6_K"  # tied: the embedding is also the head
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert {types[f"blk.0.{g}.weight"] for g in GGUF_NAMES.values()} == {"Q4_K"}
    assert types["output_norm.weight"] == "F32"
    # llama-quantize's use_more_bits, as in the published Gemma 3 270M Q4_K_M (18 layers)
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_a_q4_k_m_file_loads_each_linear_in_its_own_format(kq_gguf, kq_ref):
    from hetegen_cli.models.formats.checkpoint import CheckpointReader
    from hetegen_cli.models.formats.quantized import read_quant_weight
    from hetegen_cli.models.shapes.quantfile import read_quantization

    _, values = kq_gguf
    ref = kq_ref
    assert ref.path.name.endswith("-mixed-g32")
    assert ref.spec.quant == "mixed" and ref.spec.quant_label == "int4-g32+int8"
    doc = read_quantization(ref.path)
    assert doc["schema_version"] == 2 and doc["format"] == "mixed" and doc["group_size"] == 32
    int8 = {"model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"}
    assert {n for n, f in doc["formats"].items() if f == "int8"} == int8
    assert len(doc["linears"]) == 14 and not doc["kept_float"]
    src = doc["source"]
    assert src["gguf_linear_types"] == {"Q4_K": 12, "Q6_K": 2}
    assert (src["linears_exact"], src["linears_float16_rounded"], src["linears_requantized"]) == (0, 12, 2)
    cpu = torch.device("cpu")
    with CheckpointReader(ref.path) as reader:
        for name in doc["linears"]:
            w = read_quant_weight(reader, name, doc)
            exact = values[f"{name}.weight"]
            err = (w.dequantize() - exact).abs()
            if name in int8:
                assert w.format == "int8" and (err <= w.scale.float()[:, None] / 2 * 1.001 + 1e-9).all(), name
            else:  # within float16 rounding of each group's scale and offset
                assert w.format == "int4" and w.group_size == 32
                g = err.view(w.out_features, -1, 32)
                bound = U * (15 * w.scale.float().abs() + w.min.float().abs())[..., None] * 1.01 + 1e-9
                assert (g <= bound).all(), name
        for name in (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "model.layers.1.input_layernorm.weight",
        ):
            got = reader.read(reader.key_for(name), torch.float32, cpu)
            assert torch.equal(got, values[name].to(torch.bfloat16).float()), name


def test_hetegen_on_the_q4_k_m_file_computes_the_model_the_file_holds(kq_gguf, kq_ref):
    """Against transformers in float32 on gguf's dequantized values: logits within 5 % of
    the largest (bfloat16 activations and int8 re-quantization of the Q6_K linears)."""
    from hetegen_cli.models.loading.quantized_loader import load_quantized

    _, values = kq_gguf
    reference = llama_from_values(KQ_CONFIG, values)
    ids = torch.tensor([[17, 4000, 31000, 9, 12345, 77, 2048, 600]])
    with load_quantized(kq_ref) as lm, torch.inference_mode():
        assert lm.dtype == f"int4+int8+{ACTIVATIONS}" and kq_ref.spec.quant_label == "int4-g32+int8"
        got = lm.model(ids).logits.float()
        want = reference(ids).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_format_for_every_linear_when_asked(kq_gguf, fmt):
    from hetegen_cli.models.shapes.quantfile import read_quantization

    ref = resolve_model(str(kq_gguf[0]), need_weights=True, quant=fmt)
    doc = read_quantization(ref.path)
    assert doc["schema_version"] == 1 and doc["format"] == fmt and ref.spec.quant == fmt
    src = doc["source"]
    if fmt == "int8":  # every linear re-quantized per row from its exact values
        assert src["linears_requantized"] == 14
    else:  # Q4_K blocks as they are (float16-rounded scales), Q6_K re-quantized into int4
        assert (src["linears_float16_rounded"], src["linears_requantized"]) == (12, 2)


def _with_unmapped(kq_gguf, tmp_path, names: list[str], kind: str = "Q2_K"):
    """A copy of the Q4_K_M file with the named linears stored as `kind` (random valid
    blocks: nothing quantizes Q2_K/Q3_K)."""
    path, _ = kq_gguf
    shapes = {"attn_q": (256, 256), "ffn_up": (512, 256), "ffn_down": (256, 512), "attn_v": (128, 256)}
    replace = {}
    for i, name in enumerate(names):
        rows, cols = shapes[name.split(".")[2]]
        replace[name] = (kind, random_blocks(kind, rows, cols, seed=i, scale=2e-3))
    return copy_gguf(path, tmp_path / f"with-{kind.lower()}.gguf", replace)


def test_unmapped_types_are_refused_before_any_conversion(kq_gguf, tmp_path):
    path = _with_unmapped(kq_gguf, tmp_path, ["blk.0.ffn_up.weight", "blk.1.attn_q.weight"], "Q3_K")
    with pytest.raises(ModelError, match=r"stores linears as Q3_K, which hetegen cannot load") as err:
        resolve_model(str(path), need_weights=True, quant="auto")
    assert (
        "supported GGUF types: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, F32, F16, BF16"
        in err.value.hint
    )
    assert "--allow-float-copy" in err.value.hint
    models = paths.models_dir()
    assert not models.exists() or not list(models.iterdir())  # nothing converted, nothing left
    result = run_quick("--model", str(path))
    assert_error(result, "Q3_K", "--allow-float-copy")


def test_allow_float_copy_dequantizes_only_the_unmapped_linears_to_bfloat16(kq_gguf, tmp_path, capsys):
    from gguf import GGUFReader, quants

    from hetegen_cli.models.formats.checkpoint import CheckpointReader
    from hetegen_cli.models.shapes.quantfile import read_quantization

    path = _with_unmapped(kq_gguf, tmp_path, ["blk.0.ffn_up.weight"])
    ref = resolve_model(str(path), need_weights=True, quant="auto", allow_float_copy=True)
    err = capsys.readouterr().err
    assert (
        "--allow-float-copy: 1 linear in Q2_K (42.00 KiB in the file) will be dequantized to bfloat16" in err
    )
    assert "256.00 KiB on disk and in memory, 6.1x their GGUF size" in err and err.count("bfloat16:") == 1
    assert err.index("--allow-float-copy") < err.index("Converting")  # the cost first
    doc = read_quantization(ref.path)
    assert doc["kept_float"] == ["model.layers.0.mlp.up_proj"]
    assert doc["source"]["linears_float_copy"] == ["model.layers.0.mlp.up_proj"]
    assert ref.spec.quant == "mixed" and len(doc["linears"]) == 13
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight")
    exact = torch.from_numpy(quants.dequantize(np.array(t.data), t.tensor_type)).reshape(512, 256)
    with CheckpointReader(ref.path) as reader:
        got = reader.read(
            reader.key_for("model.layers.0.mlp.up_proj.weight"), torch.float32, torch.device("cpu")
        )
    assert torch.equal(got, exact.to(torch.bfloat16).float())
    assert ref.spec.linears[5].quant is None and ref.spec.linears[4].quant == "int4"


def test_a_file_with_no_mapped_linear_becomes_a_bfloat16_folder_with_the_flag(kq_gguf, tmp_path):
    from hetegen_cli.models.shapes.quantfile import read_quantization

    names = [f"blk.{i}.{g}.weight" for i in range(2) for g in ("attn_q", "ffn_up", "ffn_down", "attn_v")]
    path = _with_unmapped(kq_gguf, tmp_path, names)
    copy = copy_gguf(
        path,
        tmp_path / "all-q2_k.gguf",
        {
            f"blk.{i}.{g}.weight": ("Q2_K", random_blocks("Q2_K", r, 256, seed=9))
            for i in range(2)
            for g, r in (("attn_k", 128), ("attn_output", 256), ("ffn_gate", 512))
        },
    )
    ref = resolve_model(str(copy), need_weights=True, quant="auto", allow_float_copy=True)
    assert ref.path.name.endswith("-bfloat16") and read_quantization(ref.path) is None
    assert ref.spec.quant is None and ref.spec.dtype == "bfloat16"
    cfg = json.loads((ref.path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_explicit_int8_re_quantizes_unmapped_types_without_the_flag(kq_gguf, tmp_path):
    path = _with_unmapped(kq_gguf, tmp_path, ["blk.0.ffn_up.weight"])
    ref = resolve_model(str(path), need_weights=True, quant="int8")
    assert ref.spec.quant == "int8"


def test_the_conversion_streams_and_never_holds_the_model(kq_gguf, tmp_path, monkeypatch):
    """The converter hands model.safetensors its tensors one GGUF tensor at a time: at no
    point are more than one tensor's outputs alive in the producer."""
    import hetegen_cli.models.formats.gguf_quant as gq

    seen = []
    original = gq._produce

    def watching(conv, counts, bar, task):
        for name, tensor in original(conv, counts, bar, task):
            seen.append((name, tensor.numel() * tensor.element_size()))
            yield name, tensor

    monkeypatch.setattr(gq, "_produce", watching)
    target = tmp_path / "out"
    gq.write_gguf_quantized(kq_gguf[0], target)
    embed = [n for name, n in seen if name == "model.embed_tokens.weight"]
    rows = gq.CHUNK_VALUES // 256  # rows of the embedding dequantized at a time
    assert len(embed) == -(-49152 // rows) > 1 and sum(embed) == 49152 * 256 * 2  # in chunks
    assert max(embed) == rows * 256 * 2
    linear = [n for name, n in seen if name.startswith("model.layers.1.mlp.down_proj")]
    assert linear == [256 * 512, 256 * 2]  # int8 q and scale, once each


def test_the_config_is_read_as_transformers_reads_it(kq_gguf):
    """gguf_config builds the config from hetegen's layout reader (no tokenizer arrays
    parsed): the same document transformers' AutoConfig gives, for the default model's GGUF
    and the Q4_K_M file (and Gemma 3's, in test_gguf_kquant_real.py)."""
    from transformers import AutoConfig

    from hetegen_cli.models.formats.gguf import default_gguf_path
    from hetegen_cli.models.formats.gguf_config import gguf_config
    from hetegen_cli.models.formats.gguf_read import read_gguf_layout

    for path in (default_gguf_path(), kq_gguf[0]):
        want = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        assert gguf_config(path, read_gguf_layout(path)) == want.to_dict(), path.name
