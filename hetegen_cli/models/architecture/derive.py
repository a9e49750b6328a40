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

# 2: the forward traced with its cache; 3: layer types only when sliding; 4: stated widths;
# 5: the routed experts of mixture-of-experts layers ("experts", only when there are some)
LAYOUT_VERSION = 5

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
    experts = _experts(model, layers_name, hf, source)
    _refuse_unsupported(model, layers_name, source, {rec[0] for rec in experts})
    linear_mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head_name}
    forward = _forward_order(model, head_name, {rec[0] for rec in experts}, layers_name)
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
    layout = {
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
    if experts:  # [name, layer, experts, top_k, hidden, width]; dense layouts stay as they were
        layout["experts"] = experts
    return layout


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


#: the fused expert tensors hetegen's experts module (engine.experts) computes
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
_MOE_HINT = (
    "hetegen runs mixture-of-experts layers whose experts are transformers' fused gate_up_proj "
    "[E, 2I, H] and down_proj [E, H, I] (Qwen2/3-MoE, Mixtral, OLMoE; docs/models.md)"
)


def _experts(model: Any, layers_name: str, hf: Any, source: str) -> list[list[Any]]:
    """[name, layer, E, top_k, hidden, width] of every routed-experts module in the layers (a
    module holding 3-D tensors); ModelError for fused expert tensors of another form (biases,
    other names: gpt-oss) or a router whose top-k is not in [1, E]."""
    found = []
    for name, mod in model.named_modules():
        if not name.startswith(f"{layers_name}."):
            continue
        params = {n: p for n, p in mod.named_parameters(recurse=False)}
        if not any(p.dim() >= 3 for p in params.values()):
            continue
        shapes = {n: list(p.shape) for n, p in params.items()}
        if set(params) != set(EXPERT_TENSORS) or not hasattr(mod, "act_fn"):
            raise ModelError(
                f"{source}: {name} holds fused expert weights {shapes} that hetegen cannot run", _MOE_HINT
            )
        (e, two_i, h), (e2, h2, i) = shapes["gate_up_proj"], shapes["down_proj"]
        if e != e2 or h != h2 or two_i != 2 * i:
            raise ModelError(
                f"{source}: {name} has fused expert weights of unexpected shapes {shapes}", _MOE_HINT
            )
        top_k = getattr(hf, "num_experts_per_tok", None)
        if not isinstance(top_k, int) or not 1 <= top_k <= e:
            raise ModelError(
                f"{source}: num_experts_per_tok {top_k!r} is not between 1 and the {e} experts of {name}",
                "fix config.json or fetch it again",
            )
        found.append([name, _layer_of(name, layers_name), e, top_k, h, i])
    return found


def _refuse_unsupported(model: Any, layers_name: str, source: str, experts: set[str]) -> None:
    """ModelError for weights the engine cannot place: projections that are not nn.Linear
    (2-D weights of other modules inside the layers; a MoE layer's router `gate` beside its
    experts is a fixed tensor, resident on the GPU side)."""
    from torch import nn

    routers = {f"{name.rpartition('.')[0]}.gate" for name in experts}
    for name, mod in model.named_modules():
        if not name.startswith(f"{layers_name}.") or isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        if name in experts or name in routers:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() == 2:
                raise ModelError(
                    f"{source}: {name}.{pname} is a {type(mod).__name__} projection, not nn.Linear", _HINT
                )


def _forward_order(
    model: Any, head_name: str, experts: set[str] = frozenset(), layers_name: str | None = None
) -> list[str] | None:
    """The linears in the order one meta forward of two tokens calls them (head excluded);
    None when the forward fails on meta tensors. Routed experts answer zeros during the trace
    (their token grouping needs real values; they hold no nn.Linear). With `layers_name`, only
    the first decoder layer of each kind runs (_trace_one_layer_per_kind)."""
    import torch
    from torch import nn

    modules = dict(model.named_modules())
    for name in experts:
        modules[name].forward = lambda hidden, *args, **kwargs: torch.zeros_like(hidden)
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != head_name
    ]
    layers = _trace_one_layer_per_kind(modules[layers_name], layers_name, order) if layers_name else []
    try:
        with torch.no_grad(), quiet_transformers():
            model(torch.zeros(1, 2, dtype=torch.long, device="meta"))
    except Exception:  # meta kernels are missing for some ops: registration order
        return None
    finally:
        for h in hooks:
            h.remove()
        for m in [*(modules[name] for name in experts), *layers]:
            del m.forward
    seen: dict[str, None] = {}
    for n in order:  # a module called twice (shared) counts once, at its first call
        seen.setdefault(n, None)
    return list(seen)


def _trace_one_layer_per_kind(layers: Any, layers_name: str, order: list[str]) -> list[Any]:
    """Patch each decoder layer's forward for the trace (the patched layers are returned): the
    first layer of each kind (_layer_kind) runs and its linears' order is noted; a later layer
    of that kind lists its own linears in the same order and answers the first one's output
    (meta tensors hold no values), which saves running every layer of a deep model on meta
    tensors (most of deriving a layout: 40 s for the 33 presets before)."""
    firsts: dict[tuple, dict[str, Any]] = {}
    for j, layer in enumerate(layers):
        kind = _layer_kind(layer)
        first = firsts.get(kind)
        if first is None:
            firsts[kind] = first = {}
            layer.forward = functools.partial(_run_first, layer.forward, first, f"{layers_name}.{j}.", order)
        else:
            layer.forward = functools.partial(_as_first, first, f"{layers_name}.{j}.", order)
    return list(layers)


def _run_first(forward: Any, first: dict[str, Any], prefix: str, order: list[str], *args, **kwargs) -> Any:
    start = len(order)
    out = forward(*args, **kwargs)
    first["names"] = [n[len(prefix) :] for n in order[start:] if n.startswith(prefix)]
    first["out"] = out
    return out


def _as_first(first: dict[str, Any], prefix: str, order: list[str], *args, **kwargs) -> Any:
    if "out" not in first:  # called before the first of its kind: not the usual loop
        raise RuntimeError("decoder layers called out of order")
    order.extend(prefix + n for n in first["names"])
    return first["out"]


def _layer_kind(layer: Any) -> tuple:
    """What makes two decoder layers trace alike: every submodule's name, class, parameter
    shapes and plain settings (its numbers, flags and strings, e.g. sliding or global
    attention), less the ones naming its own index."""
    kind = []
    for name, mod in layer.named_modules():
        params = tuple((n, tuple(p.shape)) for n, p in mod.named_parameters(recurse=False))
        settings = tuple(
            sorted(
                (k, v)
                for k, v in vars(mod).items()
                if isinstance(v, (bool, int, float, str)) and not k.startswith("_") and not _names_index(k)
            )
        )
        kind.append((name, type(mod).__name__, params, settings))
    return tuple(kind)


def _names_index(key: str) -> bool:
    return key.endswith(("idx", "index", "_id", "number", "_num"))


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
