"""Folders that transformers 4.x and 5.x read the same way (docs/models.md: what a converted
GGUF folder needs patched after transformers 5.x wrote it)."""

from __future__ import annotations

import json
from pathlib import Path

#: keys transformers 5.x writes into tokenizer_config.json that 4.x does not know
TOKENIZER_5X_KEYS = ("backend", "is_local", "local_files_only")


def patch_for_both_versions(out: Path) -> None:
    """Make config/tokenizer JSON read the same on transformers 4.x and 5.x."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text(encoding="utf-8"))
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["model_input_names"] = ["input_ids", "attention_mask"]
    tok["add_bos_token"] = False
    for key in TOKENIZER_5X_KEYS:
        tok.pop(key, None)
    tok_path.write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
