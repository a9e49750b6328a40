"""Where hetegen keeps its files: $HETEGEN_HOME (default ~/.cache/hetegen)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The hetegen home folder; the HETEGEN_HOME environment variable moves it."""
    env = os.environ.get("HETEGEN_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hetegen"


def default_profile_path() -> Path:
    """The saved hardware profile of this machine."""
    return home() / "profile.json"


def models_dir() -> Path:
    """Converted models (GGUF -> safetensors folders) live here."""
    return home() / "models"


def plans_dir() -> Path:
    return home() / "plans"
