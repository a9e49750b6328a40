"""Writes a model's direct-start record (run.direct) from the model a regular run loaded, and
only when the direct path computes what that model computes (docs/run.md, "Direct start").

The record holds the model's `Layout` (models.formats.direct: which stored tensor feeds which
kernel argument, read off the fused modules), the tokenizer exactly as transformers built it,
the end-of-sequence ids and what the record depends on (the files' sizes and times, the
kernel library, numpy's and hetegen's versions). Before it is written, the direct model runs
probe prompts beside the loaded one: every step's logits must agree within LOGIT_RTOL of
the largest logit, the greedy tokens must be the same, and
the recorded tokenizer must encode and decode probe texts (and the run's prompt) as
transformers' does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from hetegen_cli.core.errors import HetegenError
from hetegen_cli.core.jsonio import atomic_write
from hetegen_cli.models.formats import decode_steps, direct, kernel_lib
from hetegen_cli.models.formats.fused import norm_params
from hetegen_cli.models.formats.quant import QuantLinear
from hetegen_cli.models.loading.cache import cache_keyword, new_cache
from hetegen_cli.models.shapes.headers import folder_tensor_index
from hetegen_cli.run import direct as direct_run
from hetegen_cli.run.text import eos_token_ids

#: texts whose tokens the recorded tokenizer must give exactly as transformers' does
PROBE_TEXTS = (
    "The capital of France is",
    " leading space, trailing space ",
    "Numbers 12345 and symbols: ${x} -> [y]; 'quotes' \"too\"\n\nnew lines\ttabs",
    "Ünïcödé 日本語 émojis 🙂 and ß",
)
PROBE_STEPS = 6  # greedy tokens compared after each probe prompt
#: largest logit error over the largest logit the direct path may show against the loaded
#: model: the same kernels, but the prompt fed one token at a time and the attention in
#: another order; the default model measured 2.1e-4 (int16 activation blocks round apart)
LOGIT_RTOL = 1e-3
#: rope types whose frequencies change with the sequence (transformers' dynamic_rope_update)
_DYNAMIC_ROPE = ("dynamic", "longrope")


def layout_of(model: nn.Module) -> dict[str, Any] | None:
    """The Layout of a causal LM whose decode step is fused whole (decode_steps._ModelStep)
    on hetegen's int4/int8 kernels with dense MLPs, or None (with nothing written) for anything
    else (a MoE model's step among them)."""
    step = vars(model).get("forward")
    if not isinstance(step, decode_steps._ModelStep):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    base = step.base
    embed, rotary = base.embed_tokens, base.rotary_emb
    if type(embed) is not nn.Embedding or embed.weight.dim() != 2:
        return None  # a scaled or quantized embedding: not one the direct path reads
    rope = _rope(rotary)
    if rope is None:
        return None
    layers = []
    for layer in base.layers:
        attn = layer.self_attn.forward
        q_norm = _qk_norm(layer.self_attn, "q_norm", names, int(attn.ints[4]), attn.floats[0:2])
        k_norm = _qk_norm(layer.self_attn, "k_norm", names, int(attn.ints[5]), attn.floats[2:4])
        proj = [_linear(getattr(layer.self_attn, n), names) for n in decode_steps._PROJECTIONS]
        mlp = [_linear(getattr(layer.mlp, n, None), names) for n in ("gate_proj", "up_proj", "down_proj")]
        norms = [_norm(getattr(layer, n), names) for n in ("input_layernorm", "post_attention_layernorm")]
        if None in (*proj, *mlp, *norms, q_norm, k_norm):
            return None
        layers.append(
            {
                "norm1": norms[0],
                "attn": {
                    "proj": proj,
                    "heads": int(attn.ints[1]),
                    "kv_heads": int(attn.ints[2]),
                    "head_dim": int(attn.ints[3]),
                    "q_norm": q_norm or None,
                    "k_norm": k_norm or None,
                    "scaling": float(attn.floats[4]),
                },
                "norm2": norms[1],
                "mlp": mlp,
            }
        )
    final = _norm(base.norm, names)
    head = _head(step.head, embed, names)
    if final is None or head is None:
        return None
    return {
        "version": direct.LAYOUT_VERSION,
        "hidden": int(embed.weight.shape[1]),
        "vocab": int(embed.weight.shape[0]),
        "embed": f"{names[id(embed)]}.weight",
        "rope": rope,
        "layers": layers,
        "norm": final,
        "head": head,
    }


def _linear(module: Any, names: dict[int, str]) -> dict[str, Any] | None:
    if not isinstance(module, QuantLinear) or module.native is None or id(module) not in names:
        return None
    name = names[id(module)]
    return {
        "name": name,
        "min": "mins" in module._buffers,  # int4 held asymmetric (else symmetric, as Q4_0)
        "format": module.format,
        "group": module.group_size,
        "rows": module.out_features,
        "in": module.in_features,
        "bias": f"{name}.bias" if module.bias is not None else None,
    }


def _norm(module: Any, names: dict[int, str]) -> dict[str, Any] | None:
    params = getattr(module.forward, "params", None) or norm_params(module)
    if params is None or id(module) not in names:
        return None
    _, eps, shift = params
    return {"weight": f"{names[id(module)]}.weight", "eps": float(eps), "shift": float(shift)}


def _qk_norm(attn: nn.Module, key: str, names: dict[int, str], mode: int, floats: Any) -> dict | None:
    """{} for no norm (mode 0), the norm's entry with its mode, or None when unreadable."""
    if mode == 0:
        return {}
    module = getattr(attn, key, None)
    if module is None or id(module) not in names:
        return None
    return {
        "weight": f"{names[id(module)]}.weight",
        "eps": float(floats[0]),
        "shift": float(floats[1]),
        "mode": mode,
    }


def _head(head: Any, embed: nn.Embedding, names: dict[int, str]) -> dict[str, Any] | None:
    if isinstance(head, QuantLinear):
        return _linear(head, names)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if head.weight.data_ptr() == embed.weight.data_ptr():
        return {"float": f"{names[id(embed)]}.weight"}
    return {"float": f"{names[id(head)]}.weight"}


def _rope(rotary: nn.Module) -> dict[str, Any] | None:
    """{inv_freq, scaling} of a rotary embedding whose angles are position x inv_freq at every
    position (checked against the module at a few positions), or None."""
    inv, scaling = getattr(rotary, "inv_freq", None), getattr(rotary, "attention_scaling", None)
    if not isinstance(inv, torch.Tensor) or inv.dim() != 1 or not isinstance(scaling, (int, float)):
        return None
    if any(d in str(getattr(rotary, "rope_type", "default")) for d in _DYNAMIC_ROPE):
        return None
    inv = inv.detach().float().cpu()
    positions = torch.tensor([[0, 1, 37, 1000, 8191]])
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, 1, 1), positions)
    angle = inv[None, :] * positions[0, :, None].float()
    angle = torch.cat([angle, angle], dim=-1)
    want = (angle.cos() * scaling, angle.sin() * scaling)
    if cos.shape[-1] != want[0].shape[-1] or not all(
        torch.allclose(got[0].float(), w, rtol=1e-5, atol=1e-6)
        for got, w in zip((cos, sin), want, strict=True)
    ):
        return None
    return {"inv_freq": [float(v) for v in inv.tolist()], "scaling": float(scaling)}


def remember(model: nn.Module, folder: Path, tokenizer: Any, prompt: str, dtype: str) -> str | None:
    """Write the direct-start record of the model loaded from `folder` (module docstring),
    unless one is current; a record that refuses the direct path (and why) when the direct
    model is not what was loaded, so the check is not repeated until something changes.
    `dtype` is the loaded model's label (LoadedModel.dtype), which direct runs report too.
    Returns one line saying what it did and what it cost, or None when it did nothing. A
    record that cannot be written is said in that line; the run itself is not affected."""
    try:
        return _remember(model, folder, tokenizer, prompt, dtype)
    except (HetegenError, OSError) as exc:
        return f"no direct start recorded for this model: {getattr(exc, 'message', None) or exc}"


def _remember(model: nn.Module, folder: Path, tokenizer: Any, prompt: str, dtype: str) -> str | None:
    if direct_run.current_record(folder) is not None:
        return None
    start = time.perf_counter()
    layout = layout_of(model)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if layout is None or backend is None:
        return None  # not a model the direct path reads: nothing to remember
    clean = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    eos = sorted(eos_token_ids(model, tokenizer))
    extra = _made_at_load(model, layout, folder)
    extra_file = direct_run.extra_path(folder) if extra else None
    why, err = None, None
    try:
        if extra_file is not None:
            atomic_write(extra_file, safetensors.torch.save(extra))
        dm = direct.DirectModel(folder, layout, torch.get_num_threads(), (extra_file,) if extra_file else ())
    except (direct.LayoutError, kernel_lib.Unavailable, OSError, ValueError) as exc:
        why = f"the direct model could not be built: {exc}"
    if why is None:
        words = direct_run.Words(backend.to_str(), clean)
        why = _tokenizer_differs(tokenizer, words, prompt)
    if why is None:
        why, err = _model_differs(model, dm, tokenizer)
    seconds = time.perf_counter() - start
    checked = {"seconds": round(seconds, 3), "max_rel_err": err, "refused": why, "dtype": dtype}
    if why is not None:
        if extra_file is not None:
            extra_file.unlink(missing_ok=True)
        direct_run.write_record(folder, None, "", clean, eos, None, checked)
        return f"no direct start for this model ({why}): runs take the regular path"
    direct_run.write_record(folder, layout, backend.to_str(), clean, eos, extra_file, checked)
    return (
        f"checked a direct start for this model in {seconds:.2f} s (logits within {err:.1e} of the "
        "largest): later greedy runs start without torch or transformers (docs/run.md)"
    )


def _made_at_load(model: nn.Module, layout: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
    """The layout's quantized tensors that are not in the folder's files, from the loaded
    modules (e.g. the int8 LM head models.loading.quantized_loader makes from a tied
    embedding), by the names the files would give them."""
    stored = set(folder_tensor_index(folder))
    linears = [layout["head"]] if "name" in layout["head"] else []
    for layer in layout["layers"]:
        linears += [*layer["attn"]["proj"], *layer["mlp"]]
    out: dict[str, torch.Tensor] = {}
    for spec in linears:
        name = spec["name"]
        if f"{name}.weight.q" in stored:
            continue
        b = model.get_submodule(name)._buffers
        out[f"{name}.weight.q"] = b["q"].contiguous()
        out[f"{name}.weight.scale"] = b["scales"].view(torch.float16).contiguous()
        if spec["min"]:
            out[f"{name}.weight.min"] = b["mins"].view(torch.float16).contiguous()
    return out


def _tokenizer_differs(tokenizer: Any, words: direct_run.Words, prompt: str) -> str | None:
    for text in (*PROBE_TEXTS, prompt):
        want = [int(i) for i in tokenizer(text)["input_ids"]]
        got = words(text)["input_ids"]
        if got != want:
            return f"its tokenizer, rebuilt, encodes {text[:30]!r} differently"
        for ids in (want, want[1:], want[:-1]):
            if words.decode(ids, skip_special_tokens=True) != tokenizer.decode(ids, skip_special_tokens=True):
                return f"its tokenizer, rebuilt, decodes {text[:30]!r} differently"
    return None


def _model_differs(model: nn.Module, dm: direct.DirectModel, tokenizer: Any) -> tuple[str | None, float]:
    """Each probe prompt through the loaded model as run.generate runs it (one forward over
    the prompt, then decode steps) and through the direct model (one step per token): (what
    differed or None, the largest logit error over the largest logit). Logits must agree
    within LOGIT_RTOL at the prompt's last token and every greedy step, and the greedy tokens
    must be the same."""
    key, worst = cache_keyword(model), 0.0
    for text in PROBE_TEXTS[:2]:
        ids = [int(i) for i in tokenizer(text)["input_ids"]]
        cache = new_cache(model, capacity=len(ids) + PROBE_STEPS)
        dm.start(len(ids) + PROBE_STEPS)
        for token in ids[:-1]:
            dm.step(token)
        feed, token = torch.tensor([ids]), ids[-1]
        with torch.inference_mode():
            for n in range(PROBE_STEPS):
                want = model(input_ids=feed, use_cache=True, **{key: cache}).logits[0, -1].float()
                got = torch.from_numpy(dm.step(token).copy())
                err = (got - want).abs().max().item() / max(1e-6, want.abs().max().item())
                worst = max(worst, err)
                if not err <= LOGIT_RTOL:
                    return f"its logits differ by {err:.2g} of the largest at step {n} of a probe", worst
                token = int(want.argmax())
                if int(got.argmax()) != token:
                    return f"its greedy token differs at step {n} of a probe", worst
                feed = torch.tensor([[token]])
    return None, worst
