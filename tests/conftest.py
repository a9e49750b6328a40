"""Shared fixtures: an isolated HETEGEN_HOME per test, tiny models, offline hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_llama, build_tiny_opt

REPO = Path(__file__).resolve().parent.parent

try:  # the property tests need Hypothesis (a dev extra); a bare GPU machine may lack it
    import hypothesis  # noqa: F401
except ImportError:
    collect_ignore_glob = ["*/test_*_properties.py"]
#: Converted real models are kept here between test runs (git-ignored), not per test.
SHARED_MODELS = Path(os.environ.get("HETEGEN_TEST_MODELS", REPO / ".hetegen-test-cache" / "models"))

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
    monkeypatch.setenv("HETEGEN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


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
