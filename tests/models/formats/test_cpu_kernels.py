"""hetegen's quantized CPU kernels (models.formats.cpu_kernels): exact against the same
arithmetic in float64, every layout corner, and the fallback to torch's kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.quant import QuantLinear, quantize

KERNELS = cpu_kernels.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"no hetegen kernels: {cpu_kernels.why_not()}")


def blockwise_x(x: torch.Tensor) -> torch.Tensor:
    """x [n, in] as the kernels see it: int16 per block of 32 with a float32 scale, in float64."""
    b = x.to(torch.float32).reshape(x.shape[0], -1, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 32767.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d).to(torch.float64).reshape(x.shape)


SHAPES = [(1, 128), (7, 384), (48, 96), (33, 32 * 11), (64, 1024)]  # odd block counts too
CASES = [
    (fmt, group, out, inp, tokens)
    for fmt, groups in (("int4", (32, 64, 128)), ("int8", (32,)))
    for group in groups
    for out, inp in SHAPES
    if inp % group == 0
    for tokens in (1, 3)
]


@needs_kernels
@pytest.mark.parametrize(("fmt", "group", "out", "inp", "tokens"), CASES)
def test_the_kernels_compute_the_blockwise_product_exactly(fmt, group, out, inp, tokens):
    gen = torch.Generator().manual_seed(out * inp + tokens)
    w = quantize(torch.randn(out, inp, generator=gen) * torch.rand(out, 1, generator=gen), fmt, group)
    x = torch.randn(tokens, inp, generator=gen) * 3
    x[:, :32] = 0  # an all-zero block: its scale is 0
    got = KERNELS.int4(w.q, w.scale, w.min, group, x) if fmt == "int4" else KERNELS.int8(w.q, w.scale, x)
    want = blockwise_x(x) @ w.dequantize(torch.float64).T
    assert got.shape == (tokens, out) and got.dtype == torch.float32
    torch.testing.assert_close(got.to(torch.float64), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_rows_without_changing_a_value(threads):
    w = quantize(torch.randn(100, 256), "int4")
    x = torch.randn(5, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNELS.int4(w.q, w.scale, w.min, 32, x)
        torch.set_num_threads(threads)
        assert torch.equal(KERNELS.int4(w.q, w.scale, w.min, 32, x), one)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quant_linear_takes_any_dtype_and_layout_of_x(fmt):
    lin = QuantLinear(quantize(torch.randn(64, 128), fmt))
    assert lin.native is not None and lin.kernel_dtype == torch.float32
    x = torch.randn(2, 3, 256)[..., ::2]  # not contiguous
    y = lin(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    assert torch.equal(y, lin(x.contiguous()))
    assert lin(x.to(torch.bfloat16)).dtype == torch.bfloat16


@needs_kernels
def test_both_kernels_agree_within_their_activation_rounding():
    w = quantize(torch.randn(256, 512), "int4")
    x = torch.randn(4, 512)
    want = F.linear(x, w.dequantize())
    with cpu_kernels.torch_kernels():
        theirs = QuantLinear(w)
    assert theirs.native is None
    for lin in (QuantLinear(w), theirs):
        err = (lin(x) - want).abs().max() / want.abs().max()
        assert err < 0.02


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


PROBE = "from hetegen_cli.models.formats import cpu_kernels as k;print(k.label()); print(k.why_not())"


def test_torch_is_used_when_asked_without_a_note(tmp_path):
    done = run_python(PROBE, HETEGEN_CPU_KERNELS="torch", HETEGEN_HOME=str(tmp_path))
    assert done.returncode == 0 and done.stdout.split("\n")[0] == "torch"
    assert "HETEGEN_CPU_KERNELS=torch" in done.stdout and "using torch's" not in done.stderr


def test_a_missing_compiler_falls_back_to_torch_with_one_note(tmp_path):
    done = run_python(PROBE, CC=str(tmp_path / "no-such-cc"), HETEGEN_HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    if KERNELS is None:
        pytest.skip(f"no hetegen kernels here anyway: {cpu_kernels.why_not()}")
    assert done.stdout.split("\n")[0] == "torch"
    assert done.stderr.count("using torch's quantized CPU kernels") == 1
    assert not list((tmp_path / "kernels").glob("*")), "a failed compile leaves no file"


def test_an_unknown_choice_is_named(tmp_path):
    done = run_python(PROBE, HETEGEN_CPU_KERNELS="fast", HETEGEN_HOME=str(tmp_path))
    assert "torch" in done.stdout and "'fast' is not one of auto, torch" in done.stderr


@needs_kernels
def test_the_library_is_compiled_once_per_source_and_reused(tmp_path):
    first = run_python(PROBE, HETEGEN_HOME=str(tmp_path))
    built = list((tmp_path / "kernels").glob("*.so"))
    assert first.stdout.split("\n")[0] == "hetegen-avx2" and len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    again = run_python(PROBE, HETEGEN_HOME=str(tmp_path))
    assert again.stdout.split("\n")[0] == "hetegen-avx2"
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [mtime]


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_dequantization_gives_the_stored_values_exactly(fmt):
    w = quantize(torch.randn(40, 352), fmt, 32)
    got = KERNELS.dequantize(fmt, w.q, w.scale, w.min, w.group_size)
    torch.testing.assert_close(got, w.dequantize(torch.float32), rtol=2e-7, atol=0)  # FMA: one rounding


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_prefill_multiplies_the_dequantized_weight_in_chunks(fmt, monkeypatch):
    """From DENSE_TOKENS tokens: float32 W (in chunks of DENSE_CHUNK floats) times x, the
    dequantized product to float32 rounding; below it, the int16 products."""
    monkeypatch.setattr(cpu_kernels, "DENSE_CHUNK", 64 * 7)  # 7 rows of 64 inputs a chunk
    w = quantize(torch.randn(48, 64), fmt, 32)
    lin = QuantLinear(w)
    x = torch.randn(cpu_kernels.DENSE_TOKENS, 64)
    want = x @ w.dequantize(torch.float32).T
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
    few = lin(x[:3])
    torch.testing.assert_close(few, blockwise_x(x[:3]).float() @ w.dequantize(torch.float32).T)
    assert not torch.equal(few, x[:3] @ w.dequantize(torch.float32).T)  # the int16 path did run


def symmetric_weight(out: int, inp: int, group: int, gen: torch.Generator):
    """An int4 weight as GGUF Q4_0 stores it: every group's min is -8 times its scale."""
    w = quantize(torch.randn(out, inp, generator=gen), "int4", group)
    w.min.copy_((-8.0 * w.scale.to(torch.float32)).to(w.min.dtype))
    return w


@needs_kernels
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("tokens", [1, 5, cpu_kernels.DENSE_TOKENS])
def test_symmetric_int4_reads_no_mins_and_gives_the_same_product(group, tokens):
    """A Q4_0-like weight is held without its mins (2 bytes fewer per 32 weights) and the
    products (int16 and dequantized) are the blockwise / float32 product of its values."""
    gen = torch.Generator().manual_seed(group + tokens)
    w = symmetric_weight(48, 256, group, gen)
    lin = QuantLinear(w)
    assert QuantLinear.symmetric(w) and "mins" not in lin._buffers
    assert lin.held_bytes == w.q.numel() + 2 * w.scale.numel()
    x = torch.randn(tokens, 256, generator=gen)
    dense = tokens >= cpu_kernels.DENSE_TOKENS
    want = (x.double() if dense else blockwise_x(x)) @ w.dequantize(torch.float64).T
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with_mins = KERNELS.int4(w.q, w.scale, w.min, group, x[:4])
    without = KERNELS.int4(w.q, w.scale, None, group, x[:4])
    torch.testing.assert_close(without, with_mins, rtol=1e-5, atol=1e-5)


def test_an_asymmetric_int4_weight_keeps_its_mins():
    w = quantize(torch.randn(16, 64).abs(), "int4", 32)  # all positive: min > -8 scale
    assert not QuantLinear.symmetric(w)
    if KERNELS is not None:
        assert "mins" in QuantLinear(w)._buffers
