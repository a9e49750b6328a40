"""The transformers config and the tokenizer a GGUF file carries, read from hetegen's layout
reader (models.formats.gguf_read) the way transformers' own GGUF loader reads them, without
parsing the tokenizer's arrays twice (docs/models.md, "Your own GGUF files").
"""

from __future__ import annotations

from pathlib import Path

from hetegen_cli.core.errors import ModelError
from hetegen_cli.models.architecture.build import quiet_transformers
from hetegen_cli.models.formats.gguf_read import GgufLayout, read_gguf_layout


def config_and_tokenizer(gguf: Path, layout: GgufLayout, out: Path) -> dict:
    """The config dict of a GGUF (gguf_config); the tokenizer and its chat template are saved
    into `out` (save_gguf_tokenizer)."""
    try:
        with quiet_transformers():
            config = gguf_config(gguf, layout)
    except Exception as exc:
        raise ModelError(
            f"cannot read the metadata of GGUF file {gguf.name}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "check that it is a complete GGUF file of a supported architecture",
        ) from exc
    save_gguf_tokenizer(gguf, out, layout)
    config.pop("quantization_config", None)
    return config


#: architectures whose config transformers' GGUF loader adjusts beyond its key mapping, or
#: builds another way: read through AutoConfig as they are
_CONFIG_BY_AUTOCONFIG = ("stablelm", "gpt-oss", "lfm2", "minimax-m2", "gemma4", "t5", "t5encoder")
#: GGUF architecture -> transformers model_type where they differ and hetegen reads the keys
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
#: mixture-of-experts keys (llama.cpp's, under the architecture's prefix) -> config fields;
#: transformers' GGUF tables lack most of them (docs/models.md, "GGUF MoE files")
_MOE_KEYS = {
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "expert_weights_norm": "norm_topk_prob",
}


def _key_mapping(mapping: dict, model_type: str) -> dict:
    """transformers' GGUF key mapping of `model_type`, with the MoE keys: a llama GGUF with
    experts is Mixtral (`num_local_experts`; its expert width is `feed_forward_length`), and
    OLMoE, which transformers' tables lack, reads llama's keys."""
    base = mapping.get(model_type) or mapping.get("llama" if model_type in ("mixtral", "olmoe") else "", {})
    moe = dict(_MOE_KEYS)
    if model_type == "mixtral":
        moe["expert_count"] = "num_local_experts"
        moe.pop("expert_weights_norm")  # Mixtral always renormalizes its top-k weights
    if model_type not in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral"):
        moe = {}
    return {**base, **moe}


def gguf_config(gguf: Path, layout: GgufLayout) -> dict:
    """transformers' config dict of a GGUF, built from the metadata hetegen's layout reader
    keeps, the way transformers' own loader builds it (modeling_gguf_pytorch_utils.
    load_gguf_checkpoint: its key mapping and defaults, the tied head when there is no
    output.weight, Gemma 3's text model, the vocabulary from the token count), with the
    mixture-of-experts keys transformers' tables lack (expert widths, Mixtral as a llama GGUF
    with experts, OLMoE). transformers' AutoConfig parses every metadata array on the way, the
    tokenizer's too: 137 MB and 3.5 s for a 49,152-token vocabulary. Architectures it treats
    specially, and transformers without the mapping tables, go through AutoConfig (tested
    equal on real files)."""
    try:
        from transformers import CONFIG_MAPPING
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    except ImportError:
        GGUF_CONFIG_MAPPING = {}
    arch = layout.architecture
    updated = _MODEL_TYPES.get(arch, arch)
    if "llama" in arch and layout.metadata.get("general.name") == "mistral":
        updated = "mistral"
    if arch == "llama" and layout.metadata.get("llama.expert_count", 0) > 0:
        updated = "mixtral"
    mapping = _key_mapping(GGUF_CONFIG_MAPPING, updated) if GGUF_CONFIG_MAPPING else {}
    if arch in _CONFIG_BY_AUTOCONFIG or not mapping:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        return config.to_dict()
    config: dict = {
        "tie_word_embeddings": "output.weight" not in layout.tensors or arch in ("falcon", "bloom")
    }
    for key, value in (
        GGUF_CONFIG_DEFAULTS_MAPPING.get(updated) or GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}
    ).items():
        config.setdefault(key, value)
    for key, value in layout.metadata.items():
        prefix, _, rest = key.partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        table = mapping if prefix == arch else GGUF_CONFIG_MAPPING.get(prefix, {})
        target = table.get(rest, -1)
        if target not in (-1, None):
            config[target] = value
    if config.get("model_type") == "gemma3":  # the GGUF holds the text backbone only
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in layout.array_lengths:
        config["vocab_size"] = layout.array_lengths["tokenizer.ggml.tokens"]
    doc = CONFIG_MAPPING[config["model_type"]].from_dict(config).to_dict()
    return {**doc, "_name_or_path": str(gguf.parent)}  # as AutoConfig names it


def save_gguf_tokenizer(gguf: Path, out: Path, layout: GgufLayout | None = None) -> None:
    """The tokenizer and chat template a GGUF carries, saved into `out` (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when the file has one), for any architecture:
    transformers 5's GGUF tokenizer reader builds it from the `tokenizer.*` metadata alone
    (no config, so an architecture whose config transformers cannot rebuild from a GGUF still
    gets its tokenizer); transformers 4 goes through AutoTokenizer. Whether to add BOS is what
    the file says (`tokenizer.ggml.add_bos_token`; transformers 4.x would add one anyway)."""
    layout = layout or read_gguf_layout(gguf)
    try:
        with quiet_transformers():
            tokenizer = _gguf_tokenizer(gguf)
    except Exception as exc:
        raise ModelError(
            f"cannot read the tokenizer of GGUF file {gguf.name}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "the file's tokenizer.* metadata may be missing or of a kind transformers cannot build",
        ) from exc
    add_bos = layout.metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None:
        tokenizer.add_bos_token = bool(add_bos)
    template = layout.metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)


def _gguf_tokenizer(gguf: Path):
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    from transformers import PreTrainedTokenizerFast

    arch, tokens, config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(arch, tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
