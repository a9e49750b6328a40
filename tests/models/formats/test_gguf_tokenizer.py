"""The tokenizer and chat template of a GGUF, for every architecture transformers' GGUF loader
reads (models.formats.gguf_config.save_gguf_tokenizer): files written by GGUFWriter with a
small byte-level BPE or SentencePiece vocabulary, a chat template naming the architecture and
the file's own add_bos_token. Which architectures hetegen then converts is a matter of its
model shapes (models.formats.gguf.supported_gguf_architectures)."""

from __future__ import annotations

import pytest

from hetegen_cli.models.formats.gguf_config import save_gguf_tokenizer
from hetegen_cli.models.formats.gguf_read import gguf_architecture, supported_gguf_architectures

ENCODER_DECODER = ("t5", "umt5")  # hetegen runs decoder-only models


def _transformers_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        from transformers.integrations.gguf import GGUF_ARCHS
    except ImportError:  # transformers 4.x
        GGUF_ARCHS = {}
    names = set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)
    return sorted(names - {"general", "tokenizer", *ENCODER_DECODER})


def _bpe_file(path, arch: str, add_bos: bool):
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "he", "ll", "hell", "hello"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["h e", "l l", "he ll", "hell o"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}[" + arch + "]{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", _transformers_gguf_architectures())
def test_tokenizer_and_chat_template_come_from_the_gguf_for_every_architecture(tmp_path, arch):
    from transformers import AutoTokenizer

    add_bos = arch.startswith("gemma")  # as Gemma files say; most others do not
    path = _bpe_file(tmp_path / f"{arch}.gguf", arch, add_bos)
    out = tmp_path / "out"
    out.mkdir()
    save_gguf_tokenizer(path, out)
    assert (out / "chat_template.jinja").read_text() == (
        "{% for m in messages %}[" + arch + "]{{ m['content'] }}{% endfor %}"
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello hello").input_ids
    assert ids[-1] == ids[-3] == 261 and len(ids) == 3 + add_bos  # "hello", " ", "hello": merged
    assert (ids[0] == 0) is add_bos  # BOS exactly when the file says so
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello hello"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == f"[{arch}]hi"


def test_which_gguf_architectures_hetegen_converts_follows_its_tested_architectures(tmp_path, monkeypatch):
    from hetegen_cli.models.shapes import config

    assert {"llama", "mistral", "qwen2", "gemma3"} <= set(supported_gguf_architectures())
    path = _bpe_file(tmp_path / "gemma3.gguf", "gemma3", True)
    assert gguf_architecture(path) == "gemma3"  # the GGUF's text model is gemma3_text
    # an architecture hetegen has not tested is refused
    monkeypatch.setattr(config, "TESTED_ARCHITECTURES", ("llama",))
    with pytest.raises(Exception, match="architecture 'gemma3', which hetegen cannot convert"):
        gguf_architecture(path)
