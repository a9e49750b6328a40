"""Shared fixtures: an isolated HETEGEN_HOME per test, tiny models, offline hub."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest -n: each worker gets its share of the cores as torch threads (set before torch is
    # imported), so that the workers' threads do not outnumber the cores
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

from tests.tiny_models import (
    TINY_GGUF_CONFIG,
    TINY_GGUF_SEED,
    TINY_GGUF_STD,
    build_tiny_llama,
    build_tiny_opt,
    gguf_stored_values,
)

REPO = Path(__file__).resolve().parent.parent

collect_ignore: list[str] = []
collect_ignore_glob: list[str] = []
if importlib.util.find_spec("hypothesis") is None:
    # the property tests need Hypothesis (a dev extra); a bare GPU machine may lack it
    collect_ignore_glob.append("*/test_*_properties.py")
if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn", "openai", "httpx")):
    # the server's tests need its packages, which the GPU machine's image lacks
    # (docs/gpu-check.md): there `pytest -m cuda tests` collects the rest
    collect_ignore.append("serve")
#: Converted real models are kept here between test runs (git-ignored), not per test.
SHARED_MODELS = Path(os.environ.get("HETEGEN_TEST_MODELS", REPO / ".hetegen-test-cache" / "models"))
#: hetegen's compiled CPU kernels (models.formats.cpu_kernels), shared by the tests' homes
SHARED_KERNELS = REPO / ".hetegen-test-cache" / "kernels"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HETEGEN_NO_PROGRESS"] = "1"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def hetegen_home(tmp_path, monkeypatch):
    """Point HETEGEN_HOME at a fresh temporary folder; share converted models across tests."""
    home = tmp_path / "hetegen-home"
    home.mkdir()
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    SHARED_KERNELS.mkdir(parents=True, exist_ok=True)  # compiled once per source, not per test
    (home / "kernels").symlink_to(SHARED_KERNELS, target_is_directory=True)
    monkeypatch.setenv("HETEGEN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def presets_home(tmp_path_factory) -> Path:
    """One HETEGEN_HOME for the tests that list every preset (`hetegen models`): deriving the
    33 presets' layouts takes about 10 s the first time and is cached there for the next."""
    return tmp_path_factory.mktemp("presets-home")


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_copy(tiny_llama_dir, tmp_path) -> Path:
    """A private copy of the tiny LLaMA folder that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny-copy"))


@pytest.fixture(params=["opt", "llama"])
def tiny_dir(request, tiny_opt_dir, tiny_llama_dir) -> Path:
    """Each tiny model in turn."""
    return tiny_opt_dir if request.param == "opt" else tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path, hetegen's int4 ModelRef of it, the values it holds by transformers name): a
    tiny synthetic Q4_0 GGUF (tests.tiny_models.TINY_GGUF_CONFIG), written and converted once
    (the conversion under `path.parent / "home"`). Skips without the default model's GGUF,
    whose tokenizer it copies."""
    from hetegen_cli.core.errors import ModelError
    from hetegen_cli.models.formats.gguf import default_gguf_path
    from hetegen_cli.models.formats.gguf_write import write_llama_gguf
    from hetegen_cli.models.loading.source import resolve_model

    try:
        tokenizer = default_gguf_path()
    except ModelError as exc:
        pytest.skip(f"the tokenizer comes from the default model's GGUF: {exc.message}")
    root = tmp_path_factory.mktemp("tiny-gguf")
    path = write_llama_gguf(
        TINY_GGUF_CONFIG,
        root / f"synthetic-tiny-gguf-q4_0-seed{TINY_GGUF_SEED}.gguf",  # as bench names it
        "Q4_0",
        seed=TINY_GGUF_SEED,
        std=TINY_GGUF_STD,
        tokenizer_gguf=tokenizer,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HETEGEN_HOME", str(root / "home"))  # its conversion, with it
        ref = resolve_model(str(path), need_weights=True, quant="auto")
    return path, ref, gguf_stored_values(TINY_GGUF_CONFIG, "Q4_0", TINY_GGUF_SEED, TINY_GGUF_STD)
