"""The shapes hetegen plans with, derived from transformers' own model (docs/models.md,
"Architectures"): the causal LM is built on the meta device from its config and run once on
meta tensors, so every nn.Linear is listed in the order the forward calls it, with its shape,
bias and decoder layer; every tensor a checkpoint holds comes from its state dict; the head's
tie, the attention widths and the layer types (sliding-window or global attention, for the
KV cache) from the config. No per-architecture tables: what needs a rule is a named adapter
below. The result (a *layout*, plain JSON) is cached per config in $HETEGEN_HOME/layouts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import sys
from typing import Any

from hetegen_cli.core import paths
from hetegen_cli.core.errors import HetegenError, ModelError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.architecture.build import hf_config, meta_causal_lm, quiet_transformers

LAYOUT_VERSION = 4  # 2: the forward traced with its cache; 3: layer types only when sliding; 4: stated widths

#: roles by the linear's attribute name (cosmetic, except "o": the attention's output, after
#: which the cost model places the attention, and "lm_head")
ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "dense": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",
    "fc1": "fc1",
    "fc2": "fc2",
    "c_fc": "fc1",
    "c_proj": "fc2",
}


def derive_layout(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The layout of `config`'s model (cached): see the module docstring. ModelError when
    transformers cannot build it or hetegen cannot run it (with the reason)."""
    key = _cache_key(config)
    cached = _read_cached(key)
    if cached is not None:
        return cached
    layout = _derive(config, source)
    _write_cached(key, layout)
    return layout


def _derive(config: dict[str, Any], source: str) -> dict[str, Any]:
    import torch
    from torch import nn

    hf = hf_config(config, source)
    model = meta_causal_lm(hf, source, dtype=torch.float32)
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or embed is None:
        raise ModelError(f"{source}: the model's output head is not an nn.Linear", _HINT)
    head_name = names[id(head)]
    layers_name, num_layers = _decoder_layers(model, hf, source)
    _refuse_unsupported(model, layers_name, source)
    linear_mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head_name}
    forward = _forward_order(model, head_name)
    traced = forward is not None and set(forward) == set(linear_mods)
    order = forward if traced else list(linear_mods)  # registration order if the trace failed
    linears = []
    for name in order:
        mod = linear_mods[name]
        layer = _layer_of(name, layers_name)
        if layer is None:  # outside the layers (OPT-350m's project_in/out): fixed, GPU-resident
            continue
        role = ROLES.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1])
        linears.append([name, layer, role, mod.out_features, mod.in_features, mod.bias is not None])
    tied = head.weight is embed.weight
    with quiet_transformers():
        state = model.state_dict()
    tensors = {k: list(v.shape) for k, v in state.items()}
    if tied:
        tensors.pop(f"{head_name}.weight", None)
    heads = int(hf.num_attention_heads)
    hidden = int(hf.hidden_size)
    layer_types = getattr(hf, "layer_types", None)
    window = getattr(hf, "sliding_window", None)
    sliding = layer_types is not None and any(t == "sliding_attention" for t in layer_types)
    return {
        "version": LAYOUT_VERSION,
        "architecture": config["model_type"],
        "hidden_size": hidden,
        "num_layers": num_layers,
        "num_heads": heads,
        "num_kv_heads": int(getattr(hf, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(hf, "head_dim", None) or hidden // heads),
        "vocab_size": int(hf.vocab_size),
        "max_positions": int(getattr(hf, "max_position_embeddings", None) or 2048),
        "tie_word_embeddings": bool(tied),
        "layer_types": list(layer_types) if sliding else None,  # None: every layer global
        "sliding_window": int(window) if sliding and window else None,
        "linears": linears,
        "head": [head_name, head.out_features, head.in_features, head.bias is not None],
        "tensors": tensors,
        "order": "forward" if traced else "registration",
    }


_HINT = "hetegen runs decoder-only causal LMs whose projections are nn.Linear (docs/models.md)"


def _decoder_layers(model: Any, hf: Any, source: str) -> tuple[str, int]:
    """(name, length) of the ModuleList holding the decoder layers."""
    from torch import nn

    want = int(hf.num_hidden_layers)
    lists = [(n, len(m)) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == want]
    if not lists:
        raise ModelError(f"{source}: no list of {want} decoder layers in the model", _HINT)
    return lists[0]


def _layer_of(name: str, layers_name: str) -> int | None:
    prefix = f"{layers_name}."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def _refuse_unsupported(model: Any, layers_name: str, source: str) -> None:
    """ModelError for weights the engine cannot place: projections that are not nn.Linear
    (2-D weights of other modules inside the layers) and fused expert tensors (3-D: MoE)."""
    from torch import nn

    for name, mod in model.named_modules():
        if not name.startswith(f"{layers_name}.") or isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 3:
                raise ModelError(
                    f"{source}: {name}.{pname} holds fused expert weights {list(p.shape)}: "
                    "mixture-of-experts models are not supported yet",
                    "run a dense model",
                )
            if p.dim() == 2:
                raise ModelError(
                    f"{source}: {name}.{pname} is a {type(mod).__name__} projection, not nn.Linear", _HINT
                )


def _forward_order(model: Any, head_name: str) -> list[str] | None:
    """The linears in the order one meta forward of two tokens calls them (head excluded);
    None when the forward fails on meta tensors."""
    import torch
    from torch import nn

    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != head_name
    ]
    try:
        with torch.no_grad(), quiet_transformers():
            model(torch.zeros(1, 2, dtype=torch.long, device="meta"))
    except Exception:  # meta kernels are missing for some ops: registration order
        return None
    finally:
        for h in hooks:
            h.remove()
    seen: dict[str, None] = {}
    for n in order:  # a module called twice (shared) counts once, at its first call
        seen.setdefault(n, None)
    return list(seen)


def _cache_key(config: dict[str, Any]) -> str:
    """The layout's key: the config, transformers' version (read from its metadata: importing
    transformers took ~1 s of every cached `hetegen run`) and LAYOUT_VERSION."""
    text = json.dumps(
        {"config": config, "transformers": _transformers_version(), "layout": LAYOUT_VERSION},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.cache
def _transformers_version() -> str:
    """The installed transformers' version, without importing it (its `__version__`)."""
    module = sys.modules.get("transformers")
    if module is not None:
        return str(module.__version__)
    return importlib.metadata.version("transformers")


def _read_cached(key: str) -> dict[str, Any] | None:
    path = paths.home() / "layouts" / f"{key}.json"
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return layout if isinstance(layout, dict) and layout.get("version") == LAYOUT_VERSION else None


def _write_cached(key: str, layout: dict[str, Any]) -> None:
    with contextlib.suppress(OSError, HetegenError):  # a read-only home: derive again next time
        atomic_write(paths.home() / "layouts" / f"{key}.json", json.dumps(layout))
