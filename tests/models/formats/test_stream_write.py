"""models.formats.stream_write: a safetensors file written tensor by tensor, read back by
safetensors itself; tensors out of order, of the wrong dtype or shape, or short are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hetegen_cli.models.formats.stream_write import TensorEntry, TensorStream, write_safetensors


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "lin.weight.q": torch.randint(-127, 128, (6, 16), generator=gen, dtype=torch.int8),
        "lin.weight.scale": torch.rand(6, generator=gen).to(torch.float16),
        "packed": torch.randint(0, 256, (3, 8), generator=gen, dtype=torch.uint8),
        "norm": torch.randn(5, generator=gen),
    }


def test_a_file_written_in_chunks_reads_back_with_safetensors(tmp_path):
    tensors = _tensors()
    entries = TensorStream.of(tensors).entries

    def chunks():
        for name, t in tensors.items():
            if t.dim() == 2 and t.shape[0] > 2:  # rows in uneven pieces
                yield name, t[:2]
                yield name, t[2:3]
                yield name, t[3:]
            else:
                yield name, t

    path = tmp_path / "m.safetensors"
    size = write_safetensors(path, entries, chunks())
    assert path.stat().st_size == size
    back = load_file(str(path))
    assert list(back) == list(tensors) or set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_slice("embed")[2:4], tensors["embed"][2:4])
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data starts aligned


@pytest.mark.parametrize(
    "produce, message",
    [
        (lambda t: [("lin.weight.q", t["lin.weight.q"])], "arrived where embed was expected"),
        (lambda t: [("embed", t["embed"].float())], "arrived as torch.float32"),
        (lambda t: [("embed", t["embed"][:, :4])], "arrived as"),
        (lambda t: [("embed", torch.cat([t["embed"], t["embed"][:1]]))], "more bytes than"),
        (lambda t: [("embed", t["embed"][:6])], "embed was not written in full"),
        (lambda t: list(t.items())[:-1], "norm was not written in full"),
        (lambda t: [*t.items(), ("extra", torch.zeros(1))], "where nothing more was expected"),
    ],
)
def test_what_does_not_match_the_header_is_refused(tmp_path, produce, message):
    tensors = _tensors()
    entries = [TensorEntry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with pytest.raises(ValueError, match=message):
        write_safetensors(tmp_path / "m.safetensors", entries, iter(produce(tensors)))


def test_a_name_listed_twice_is_refused(tmp_path):
    entries = [TensorEntry("a", torch.float32, (2,)), TensorEntry("a", torch.float32, (2,))]
    with pytest.raises(ValueError, match="listed twice"):
        write_safetensors(tmp_path / "m.safetensors", entries, iter([]))
