"""The float32 GEMM choice for prompt products (models.formats.cpu_gemm)."""

import json

import pytest
import torch

from hetegen_cli.core.errors import InputError
from hetegen_cli.models.formats import cpu_gemm, cpu_kernels
from hetegen_cli.models.formats.quant import quantize

ONEDNN = cpu_gemm._onednn_missing()
needs_onednn = pytest.mark.skipif(ONEDNN is not None, reason=f"no oneDNN GEMM: {ONEDNN}")


@pytest.fixture
def fresh(monkeypatch):
    """No choice made yet in this process."""
    monkeypatch.setattr(cpu_gemm, "_CHOSEN", {})
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)


@needs_onednn
@pytest.mark.parametrize("backend", cpu_gemm.BACKENDS)
def test_both_gemms_give_the_product_even_through_one_reused_buffer(fresh, monkeypatch, backend):
    monkeypatch.setenv(cpu_gemm.ENV, backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 96, generator=gen)
    buf = torch.empty(64 * 96)
    for _ in range(3):  # new weights written where the last one was: nothing may be cached by address
        w = torch.randn(64, 96, generator=gen)
        buf.copy_(w.flatten())
        got = cpu_gemm.linear(x, buf.view(64, 96))
        torch.testing.assert_close(got, (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-4)
    assert cpu_gemm.label() == backend and cpu_gemm.choice("large/short").reason == cpu_gemm.ENV


@needs_onednn
def test_measured_once_per_class_then_kept_per_machine_and_thread_count(fresh, monkeypatch):
    small = {cls: (16, 32, 64) for cls in cpu_gemm.CLASSES}
    monkeypatch.setattr(cpu_gemm, "CLASSES", small)
    got = {cls: cpu_gemm.choice(cls) for cls in cpu_gemm.CLASSES}
    path = cpu_gemm._cache_path()
    kept = json.loads(path.read_text())
    keys = {cls: cpu_gemm._machine_key(torch.get_num_threads(), cls) for cls in got}
    assert set(kept) == set(keys.values())
    for cls, made in got.items():
        assert made.reason == "measured" and made.torch_us > 0 and made.onednn_us > 0
        assert made.backend == ("onednn" if made.torch_us >= cpu_gemm.MARGIN * made.onednn_us else "torch")
        assert kept[keys[cls]] == {
            "backend": made.backend,
            "torch_us": made.torch_us,
            "onednn_us": made.onednn_us,
        }

    # a new process (no in-process choice) reads the file instead of measuring again
    monkeypatch.setattr(cpu_gemm, "_CHOSEN", {})
    monkeypatch.setattr(cpu_gemm, "_measure", lambda shape: pytest.fail("measured twice"))
    assert {cls: cpu_gemm.choice(cls) for cls in got} == got
    # what the file says is what runs, for each class apart
    backends = {
        "small/short": "torch",
        "large/short": "onednn",
        "small/long": "onednn",
        "large/long": "torch",
    }
    path.write_text(json.dumps({keys[cls]: {"backend": backend} for cls, backend in backends.items()}))
    monkeypatch.setattr(cpu_gemm, "_CHOSEN", {})
    assert cpu_gemm.label() == ", ".join(f"{cls}: {backend}" for cls, backend in backends.items())
    calls = []
    monkeypatch.setattr(
        cpu_gemm, "_onednn", lambda x, w: calls.append(x.shape[0] * w.numel()) or torch.mm(x, w.t())
    )
    short, long = cpu_gemm.LONG_TOKENS - 1, cpu_gemm.LONG_TOKENS
    for tokens in (short, long):
        for rows in (1023, 1024):  # one row of 1,024 values short of large, then large
            cpu_gemm.linear(torch.ones(tokens, 1024), torch.ones(rows, 1024))
    assert calls == [short * cpu_gemm.SMALL_WEIGHTS, long * (cpu_gemm.SMALL_WEIGHTS - 1024)]


def test_a_product_that_disagrees_keeps_torch(fresh, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_onednn", lambda x, w: torch.mm(x, w.t()) * 1.01)
    got = cpu_gemm._measure((16, 64, 128))
    assert got.backend == "torch" and "differed" in got.reason


def test_a_bad_setting_is_refused_with_a_hint(fresh, monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "blas")
    with pytest.raises(InputError, match="auto, torch, onednn") as err:
        cpu_gemm.choice("large/short")
    assert cpu_gemm.ENV in err.value.hint


def test_without_onednn_torch_runs_and_forcing_onednn_is_refused(fresh, monkeypatch):
    monkeypatch.setattr(cpu_gemm.torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_gemm.choice("large/long") == cpu_gemm.Choice("torch", "this torch is built without oneDNN")
    assert cpu_gemm.label() == "torch"
    monkeypatch.setattr(cpu_gemm, "_CHOSEN", {})
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    with pytest.raises(InputError, match="without oneDNN"):
        cpu_gemm.choice("small/short")


@needs_onednn
@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="no hetegen kernels")
@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("backend", cpu_gemm.BACKENDS)
def test_prompt_products_in_chunks_match_the_dequantized_weight(fresh, monkeypatch, fmt, backend):
    """A weight larger than one dequantization chunk goes through the chosen GEMM chunk by chunk."""
    monkeypatch.setenv(cpu_gemm.ENV, backend)
    monkeypatch.setattr(cpu_kernels, "DENSE_CHUNK", 64 * 128)  # 64 rows a chunk
    gen = torch.Generator().manual_seed(2)
    weight = quantize(torch.randn(200, 128, generator=gen), fmt, 32)
    x = torch.randn(cpu_kernels.DENSE_TOKENS, 128, generator=gen)
    got = cpu_kernels.kernels().matmul(fmt, weight.q, weight.scale, weight.min, weight.group_size, x)
    want = x.double() @ weight.dequantize(torch.float32).double().t()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert cpu_gemm.label() == backend


def test_force_sets_every_class_without_measuring(fresh, monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_measure", lambda shape: pytest.fail("measured"))
    cpu_gemm.force("torch")
    assert cpu_gemm.label() == "torch"
    assert {cpu_gemm.choice(cls).reason for cls in cpu_gemm.CLASSES} == {"forced"}
