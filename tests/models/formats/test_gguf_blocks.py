"""GGUF K-quant blocks in hetegen's layout (models.formats.gguf_blocks), against the `gguf`
package's own dequantization, on real blocks in real files written by GGUFWriter.

- Q4_K -> int4 groups of 32: the same q values; each group's scale d*sc and offset -dmin*m
  rounded to float16, so a weight is within float16 rounding of them (not exact in general:
  d*sc needs up to 17 significant bits; exact when both fit).
- Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 -> int8 per row from the exact values: within half an int8
  step of them.
- The Q4_K and Q6_K encoders the synthetic writer uses round-trip through gguf's decoder.

The same comparison on a real Q4_K_M file (Gemma 3 270M, opt-in): tests/models/formats/
test_gguf_kquant_real.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetegen_cli.models.formats.gguf_blocks import (
    NATIVE,
    dequantize_rows,
    int8_from_rows,
    q4_k_to_int4,
    quantize_q4_k,
    quantize_q6_k,
    to_quant_weight,
)
from tests.gguf_files import random_blocks, write_gguf

U = 2.0**-11  # float16's unit roundoff (11 significant bits, round to nearest)


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Weights with rows of very different magnitudes, a few outliers, some all-positive
    sub-blocks (min clamps to 0) and one all-zero row."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.geomspace(1e-3, 1.0, rows)[:, None]
    w[1, ::97] *= 12.0
    w[2, :64] = np.abs(w[2, :64])
    w[3] = 0.0
    return w.astype(np.float32)


def _through_a_file(tmp_path, kind: str, raw: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """(raw bytes as read back from a GGUF file, gguf's dequantization of them)."""
    from gguf import GGUFReader, quants

    path = write_gguf(tmp_path / f"{kind}.gguf", [("blk.0.ffn_up.weight", kind, raw)])
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type.name == kind
    data = np.array(tensor.data)
    return torch.from_numpy(data.copy()), quants.dequantize(data, tensor.tensor_type)


def test_q4_k_maps_onto_int4_groups_within_float16_rounding_of_scale_and_offset(tmp_path):
    rows, cols = 48, 512
    raw, exact = _through_a_file(tmp_path, "Q4_K", quantize_q4_k(_weights(rows, cols)))
    exact = torch.from_numpy(exact).reshape(rows, cols)
    w = q4_k_to_int4(raw, rows, cols)
    assert w.format == "int4" and w.group_size == 32 and w.scale.shape == (rows, cols // 32)
    got = w.dequantize()
    # the float32 scale and offset of each group, straight from the blocks
    b = raw.reshape(rows, cols // 256, 144)
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    dmin = b[..., 2:4].contiguous().view(torch.float16).float()
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).numpy())
    scale = (d * torch.from_numpy(sc.astype(np.float32)).reshape(rows, -1, 8)).reshape(rows, -1)
    offset = (dmin * torch.from_numpy(m.astype(np.float32)).reshape(rows, -1, 8)).reshape(rows, -1)
    assert torch.equal(w.scale, scale.half()) and torch.equal(w.min, (-offset).half())
    # q values unchanged: the exact values are scale * q - offset with got's q
    q = w.int4_values().float().view(rows, -1, 32)
    assert torch.allclose(
        scale[..., None] * q - offset[..., None], exact.view(rows, -1, 32), rtol=0, atol=1e-7
    )
    bound = U * (15 * scale + offset)[..., None] * (1 + 1e-6) + 1e-12
    err = (got - exact).abs().view(rows, -1, 32)
    assert (err <= bound).all()
    fits = (scale.half().float() == scale) & (offset.half().float() == offset)
    assert (err.amax(-1)[fits] == 0).all()  # exact where both fit float16
    assert (~fits).any() and (err.amax(-1)[~fits] > 0).any()  # and not exact in general


def test_q4_k_blocks_whose_scales_fit_float16_map_exactly(tmp_path):
    """Scales and mins that are powers of two times small integers fit float16: int4 then
    holds the file's values bit for bit."""
    rows, cols = 16, 256
    raw = random_blocks("Q4_K", rows, cols, seed=3).reshape(rows, 1, 144)
    raw[..., 0:2] = np.full((rows, 1), 2.0**-10, np.float16).view(np.uint8).reshape(rows, 1, 2)
    raw[..., 2:4] = np.full((rows, 1), 2.0**-12, np.float16).view(np.uint8).reshape(rows, 1, 2)
    raw, exact = _through_a_file(tmp_path, "Q4_K", raw.reshape(rows, -1))
    got = q4_k_to_int4(raw, rows, cols).dequantize()
    assert torch.equal(got, torch.from_numpy(exact).reshape(rows, cols))


def test_q4_k_decoders_agree_on_any_block_bytes(tmp_path):
    """hetegen's torch unpacking of the 12 scale bytes and 128 nibble bytes against gguf's
    numpy one, on random blocks (every bit pattern of sc, m and q)."""
    rows, cols = 32, 1024
    raw, exact = _through_a_file(tmp_path, "Q4_K", random_blocks("Q4_K", rows, cols, seed=1))
    got = q4_k_to_int4(raw, rows, cols).dequantize()
    exact = torch.from_numpy(exact).reshape(rows, cols)
    assert ((got - exact).abs() <= 2 * U * exact.abs().amax() + 1e-12).all()


@pytest.mark.parametrize("kind", ["Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"])
def test_five_six_and_eight_bit_types_become_int8_within_half_a_step(tmp_path, kind):
    from gguf import GGMLQuantizationType, quants

    rows, cols = 40, 512
    w = _weights(rows, cols, seed=2)
    if kind == "Q6_K":
        raw = quantize_q6_k(w)
    elif kind == "Q5_K":  # nothing quantizes Q5_K: random valid blocks
        raw = random_blocks(kind, rows, cols, seed=2)
    else:
        raw = quants.quantize(w, GGMLQuantizationType[kind])
    raw, exact = _through_a_file(tmp_path, kind, raw)
    exact = torch.from_numpy(exact).reshape(rows, cols)
    assert NATIVE[kind] == "int8"
    got = to_quant_weight(kind, raw, rows, cols)
    assert got.format == "int8" and got.scale.shape == (rows,)
    step = got.scale.float()[:, None]
    assert ((got.dequantize() - exact).abs() <= step / 2 * (1 + 1e-3) + 1e-9).all()
    row_max = exact.abs().amax(1)
    normal = row_max / 127 >= torch.finfo(torch.float16).tiny  # scales not subnormal
    rel = (got.dequantize() - exact).abs().amax(1) / row_max.clamp(min=1e-30)
    assert (rel[normal] <= (1 + 2 * U) / 254).all()


def test_int8_rows_are_requantized_a_chunk_at_a_time(monkeypatch, tmp_path):
    import hetegen_cli.models.formats.gguf_blocks as gb

    rows, cols = 40, 512
    raw, _ = _through_a_file(tmp_path, "Q6_K", quantize_q6_k(_weights(rows, cols)))
    whole = int8_from_rows("Q6_K", raw, rows, cols)
    monkeypatch.setattr(gb, "CHUNK_VALUES", 3 * cols)  # 3 rows at a time
    chunked = int8_from_rows("Q6_K", raw, rows, cols)
    assert torch.equal(whole.q, chunked.q) and torch.equal(whole.scale, chunked.scale)


@pytest.mark.parametrize("kind, encode", [("Q4_K", quantize_q4_k), ("Q6_K", quantize_q6_k)])
def test_the_k_quant_encoders_round_trip_through_gguf(tmp_path, kind, encode):
    """The encoders write valid blocks in ggml's layout: gguf's decoder gives back every
    weight within one step of its sub-block (Q4_K: 32 weights, unsigned with a min, 15 steps;
    Q6_K: 16 weights, signed, 32 steps each way), a step being the sub-block's own plus at
    most one unit of the super-block's 6- or 8-bit scale grid; mostly within half a step."""
    rows, cols = 24, 768
    w = _weights(rows, cols, seed=5)
    raw = encode(w)
    assert raw.dtype == np.uint8 and raw.shape == (rows, cols // 256 * (144 if kind == "Q4_K" else 210))
    _, back = _through_a_file(tmp_path, kind, raw)
    err = np.abs(back.reshape(rows, cols) - w)
    sub, grid = (32, 63) if kind == "Q4_K" else (16, 127)
    blocks = w.reshape(rows, -1, 256 // sub, sub)
    if kind == "Q4_K":
        step = (blocks.max(-1) - np.minimum(blocks.min(-1), 0)) / 15
        unit = np.maximum(step.max(-1, keepdims=True), -np.minimum(blocks.min(-1), 0).max(-1, keepdims=True))
    else:
        step = np.abs(blocks).max(-1) / 32
        unit = step.max(-1, keepdims=True)
    bound = (step + unit / grid * 1.01)[..., None] + 1e-7
    assert (err.reshape(blocks.shape) <= bound).all()
    assert (err.reshape(blocks.shape) <= bound / 2).mean() > 0.95
    assert (back.reshape(rows, cols)[3] == 0).all()  # the zero row stays zero
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(w[:, :100])


def test_float_rows_and_unknown_mappings():
    values = torch.randn(3, 64)
    for kind, raw in (
        ("F32", values.numpy().view(np.uint8)),
        ("F16", values.half().numpy().view(np.uint8)),
        ("BF16", values.bfloat16().view(torch.int16).numpy().view(np.uint8)),
    ):
        got = dequantize_rows(kind, raw, 64)
        assert got.dtype == torch.float32 and got.shape == (3, 64)
        assert torch.allclose(got, values, rtol=1e-2, atol=1e-2), kind
    with pytest.raises(ValueError, match="no mapping onto int4"):
        to_quant_weight("Q6_K", torch.zeros(16, 210, dtype=torch.uint8), 16, 256, "int4")
