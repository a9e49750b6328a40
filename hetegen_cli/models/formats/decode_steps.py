"""Decode steps of a whole MoE block, attention, decoder layer and model at one token (kernels/
quant_gemm.c: hetegen_attention_decode; docs/quant.md, "One call per attention, MLP, MoE
layer and norm").

An attention at one token is four quantized products and dozens of small tensor ops, a
decoder layer four module calls and two adds, the model's forward masks and bookkeeping; on a
small model they cost more than the arithmetic. `fuse_steps` gives, over the MLPs and norms that
models.formats.fused made one call each:

- each MoE block of a router and fused routed experts a step that adds the experts' one
  call into its output (`_MoeStep`),
- each LLaMA-style attention a step that makes one kernel call (`_AttentionStep`),
- each pre-norm decoder layer whose parts are all fused one Python call (`_LayerStep`),
- a causal LM whose layers are all fused a step that calls them straight (`_ModelStep`),

each checked at load against the module's own forward: a MoE block on a random token, the
others over decode steps on their own KV cache (models.loading.cache's GrowingLayer, which lets
a step write into its buffers). Anything a step does not take goes to the module's own forward.
The steps keep per-call state: one caller at a time (the serve worker is one thread).
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hetegen_cli.models.formats import cpu_kernels
from hetegen_cli.models.formats.fused import (
    Fusions,
    close_enough,
    enabled,
    matrix,
    norm_params,
    takes_one_argument,
)


def fuse_steps(model: nn.Module, new_cache: Callable[[], Any]) -> Fusions:
    """Give `model`'s attentions, decoder layers and the model itself their decode steps
    (module docstring), once, after models.formats.fused.fuse_model; `new_cache` makes an
    empty KV cache for `model` to check them on. Does nothing without hetegen's kernels."""
    if not enabled():
        return Fusions()
    attentions = layers = whole_model = rejected = moe_blocks = 0
    gen = torch.Generator().manual_seed(0)
    two_caches = _reused(new_cache)
    for module in list(model.modules()):
        if "forward" not in vars(module) and (block := _moe_forward(module)) is not None:
            agrees = _moe_agrees(block, gen)
            if agrees:
                module.forward = block
                moe_blocks += 1
            rejected += agrees is False
    for module in list(model.modules()):
        if "forward" not in vars(module) and (step := _attention_forward(module)) is not None:
            agrees = _step_agrees(step, step.own, two_caches, step.hidden, step.head_dim, gen)
            if agrees:
                module.forward = step  # instance attribute: nn.Module.__call__ finds it first
                attentions += 1
            rejected += agrees is False
    verdicts: dict[tuple, bool | None] = {}  # one check per kind of layer: the same code joins its parts
    for module in list(model.modules()):
        if "forward" not in vars(module) and (whole := _layer_forward(module)) is not None:
            kind = (type(module), type(module.self_attn), type(module.mlp))
            if kind not in verdicts:
                verdicts[kind] = _step_agrees(
                    whole, whole.own, two_caches, whole.hidden, whole.attn.head_dim, gen
                )
                whole.attn.taken = 0  # counted while checking the layer
            if verdicts[kind]:
                module.forward = whole
                layers += 1
            rejected += verdicts[kind] is False
    if "forward" not in vars(model) and (top := _model_forward(model)) is not None:
        agrees = _model_agrees(top, two_caches, gen)
        for layer in top.layers:  # counted while checking the model
            layer.taken = layer.attn.taken = 0
        if agrees:
            model.forward = top
            whole_model = 1
        rejected += agrees is False
    found = {"attentions": attentions, "layers": layers, "model": whole_model, "rejected": rejected}
    return Fusions(mlps=moe_blocks, **found)


def cache_key(forward: Callable) -> str:
    """The keyword a transformers forward takes its KV cache by: `cache` (transformers >= 5.2x)
    or `past_key_values`; for a forward that names neither (*args, **kwargs), the one this
    transformers' LLaMA attention names."""
    for f in (forward, _llama_attention_forward()):
        try:
            params = inspect.signature(f).parameters
        except (TypeError, ValueError):
            continue
        for key in ("cache", "past_key_values"):
            if key in params:
                return key
    return "past_key_values"


def _llama_attention_forward() -> Callable:
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention.forward


def _reused(new_cache: Callable[[], Any]) -> Callable[[], list]:
    """Two empty caches for a check, made once and reset for the next one (building a
    transformers cache reads its config hundreds of times)."""
    made: list = []

    def two() -> list:
        if made:
            try:
                for cache in made:
                    cache.reset()
                return made
            except AttributeError:  # a cache without reset: new ones
                made.clear()
        made.extend((new_cache(), new_cache()))
        return made

    return two


#: an attention's projections, in the order the kernel takes them
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: attributes whose presence (not None) means a computation the fused step does not do
_NOT_FUSED = ("sliding_window", "attn_logit_softcapping", "sinks")


class _AttentionStep:
    """One decode step of a LLaMA-style attention module in one kernel call
    (hetegen_attention_decode): q, k, v and o on hetegen's kernels (biases allowed), optional
    q/k RMS norms per head or over the whole projection, rotate-half rotary over the whole
    head, softmax over the cache. Called like the module: anything but one float32 token on
    the CPU with no attention mask, on a cache layer that can `reserve` room in float32
    buffers (models.loading.cache), goes to the module's own forward. `taken` counts the
    fused steps."""

    def __init__(
        self, module: nn.Module, descs: list[list[int]], ints: list[int], floats: list[float], keep: list
    ) -> None:
        self.own, self.layer_idx, self.keep = module.forward, module.layer_idx, keep
        self.hidden, self.kv_heads, self.head_dim = ints[0], ints[2], ints[3]
        self.q_proj, self.q_at = module.q_proj, descs[0][1]
        self.desc = (ctypes.c_int64 * (4 * len(descs[0])))(*[v for d in descs for v in d])
        self.ints = (ctypes.c_int64 * len(ints))(*ints)
        self.floats = (ctypes.c_float * len(floats))(*floats)
        self.kernels = cpu_kernels.kernels()
        self.taken = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs.get("hidden_states") if not args else args[0] if len(args) == 1 else None
        ready = self.prepare(x, kwargs)
        if ready is None:
            return self.own(*args, **kwargs)
        out = torch.empty(x.shape)
        self.run(x.contiguous(), ready, out, add=False)
        return out, None

    def prepare(self, x: torch.Tensor | None, kwargs: dict) -> tuple | None:
        """What `run` needs for input x and the module's keyword arguments (cache, rotary,
        mask), or None when this step does not take them."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        rope = kwargs.get("position_embeddings")
        if x is None or cache is None or rope is None or kwargs.get("attention_mask") is not None:
            return None
        if x.dtype is not torch.float32 or x.numel() != self.hidden or x.device.type != "cpu":
            return None
        if self.q_proj._buffers["q"].data_ptr() != self.q_at:  # weights moved since: not where described
            return None
        cos, sin = rope
        if cos.dtype is not torch.float32 or cos.numel() != self.head_dim or sin.numel() != self.head_dim:
            return None
        room = self._room(cache)
        return None if room is None else (*room, cos.contiguous(), sin.contiguous())

    def run(self, x: torch.Tensor, ready: tuple, out: torch.Tensor, add: bool) -> None:
        """out [H] = the attention's output for x [H] contiguous (out += it when `add`), the
        cache advanced by one position."""
        layer, kb, vb, pos, cos, sin = ready
        self.ints[6], self.ints[7], self.ints[14] = kb.shape[2], pos, add
        rc = self.kernels.attention(
            ctypes.addressof(self.desc), ctypes.addressof(self.ints), ctypes.addressof(self.floats),
            x.data_ptr(), cos.data_ptr(), sin.data_ptr(), kb.data_ptr(), vb.data_ptr(), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc:
            raise ValueError(f"hetegen's fused attention refused its input ({rc})")
        layer.filled(pos + 1)
        self.taken += 1

    def _room(self, cache: Any) -> tuple[Any, torch.Tensor, torch.Tensor, int] | None:
        """(layer, key and value buffers [1, kv heads, room, head dim], the position to write)."""
        layers = getattr(cache, "layers", None)
        if getattr(cache, "offloading", False) or not isinstance(layers, list):
            return None
        if len(layers) <= self.layer_idx:
            return None
        layer = layers[self.layer_idx]
        reserve = getattr(layer, "reserve", None)
        got = reserve(1) if reserve is not None else None
        if got is None:
            return None
        kb, vb, pos = got
        shape = (1, self.kv_heads, kb.shape[2], self.head_dim)
        for buf in (kb, vb):
            if buf.dtype is not torch.float32 or buf.shape != shape or not buf.is_contiguous():
                return None
        return layer, kb, vb, pos


def _attention_forward(module: nn.Module) -> _AttentionStep | None:
    """The fused step for a module shaped like a LLaMA attention (see _AttentionStep), or None."""
    if not all(hasattr(module, n) for n in _PROJECTIONS):
        return None
    if not isinstance(getattr(module, "layer_idx", None), int):
        return None
    hd, scaling = getattr(module, "head_dim", None), getattr(module, "scaling", None)
    if not isinstance(hd, int) or not isinstance(scaling, float) or hd % 2:
        return None
    if any(getattr(module, a, None) is not None for a in _NOT_FUSED):
        return None
    descs = [matrix(getattr(module, n), bias_ok=True) for n in _PROJECTIONS]
    if any(d is None for d in descs):
        return None
    q, k, v, o = (getattr(module, n) for n in _PROJECTIONS)
    hidden, nh, nkv = q.in_features, q.out_features // hd, k.out_features // hd
    if q.out_features % hd or k.out_features % hd or v.out_features != nkv * hd or nkv == 0 or nh % nkv:
        return None
    if (k.in_features, v.in_features, o.in_features, o.out_features) != (hidden, hidden, nh * hd, hidden):
        return None
    keep: list = []  # float32 copies the kernel reads: biases, norm weights
    biases = [_float_ptr(lin.bias, keep) for lin in (q, k, v, o)]
    norms = [_qk_norm(getattr(module, n, None), hd, heads) for n, heads in (("q_norm", nh), ("k_norm", nkv))]
    if any(n is None for n in norms):
        return None
    (qmode, qw, qeps, qshift), (kmode, kw, keps, kshift) = norms  # type: ignore[misc]
    ints = [hidden, nh, nkv, hd, qmode, kmode, 0, 0, *biases, _float_ptr(qw, keep), _float_ptr(kw, keep), 0]
    return _AttentionStep(module, descs, ints, [qeps, qshift, keps, kshift, scaling], keep)  # type: ignore[arg-type]


def _float_ptr(t: torch.Tensor | None, keep: list) -> int:
    """The address of a float32 contiguous copy of t (kept alive in `keep`), 0 for None."""
    if t is None:
        return 0
    keep.append(t.detach().float().contiguous().clone())
    return keep[-1].data_ptr()


def _qk_norm(norm: Any, hd: int, heads: int) -> tuple[int, torch.Tensor | None, float, float] | None:
    """(mode, weight, eps, shift) of an attention's q or k norm: mode 0 none, 1 per head
    (weight [hd]), 2 over the whole projection (weight [heads * hd]); None for a norm the
    kernel does not compute."""
    if norm is None or isinstance(norm, nn.Identity):
        return 0, None, 0.0, 0.0
    params = norm_params(norm)
    if params is None:
        return None
    weight, eps, shift = params
    mode = 1 if weight.numel() == hd else 2 if weight.numel() == heads * hd else None
    return None if mode is None else (mode, weight, eps, shift)


def _step_agrees(
    step: Any, own: Callable, two_caches: Callable[[], list], hidden: int, hd: int, gen: torch.Generator
) -> bool | None:
    """Two decode steps of a fused attention or decoder layer (`step`, which counts the
    steps it `taken`) against `own`, each on its own cache holding the same three-token prompt,
    with random rotary angles: True when every output is close, False when one is not, None
    when the fused path was not taken (e.g. a sliding-window cache layer) or `own` answers
    in another form."""
    key = cache_key(own)
    caches = two_caches()

    def rope(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        angle = torch.rand(1, n, hd // 2, generator=gen) * 6.3
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos(), angle.sin()

    def call(f: Callable, x: torch.Tensor, pe: tuple, cache: Any) -> torch.Tensor | None:
        out = f(hidden_states=x, position_embeddings=pe, attention_mask=None, **{key: cache})
        out = out[0] if isinstance(step, _AttentionStep) else out
        return out if isinstance(out, torch.Tensor) else None

    try:
        with torch.no_grad():
            x, pe = torch.randn(1, 3, hidden, generator=gen), rope(3)
            for cache in caches:
                call(own, x, pe, cache)
            for _ in range(2):
                x, pe = torch.randn(1, 1, hidden, generator=gen), rope(1)
                want = call(own, x, pe, caches[0])
                taken = step.taken
                got = call(step, x, pe, caches[1])
                if step.taken == taken or want is None or got is None:
                    return None
                if not close_enough(got, want.float()):
                    return False
    except Exception:  # a module this check cannot drive (e.g. a partial rotary) stays as it is
        return None
    step.taken = 0
    return True


class _MoeStep:
    """A sparse MoE block made of a router `gate` and routed `experts` only (OLMoE, Qwen3-MoE,
    Mixtral; not Qwen2-MoE's shared expert) at one float32 token on the CPU: the router's own
    forward (its softmax, top-k and normalization, whatever the architecture's), then the chosen
    experts in one kernel call adding into the output (QuantExperts.add_one_token), without the
    block's and the experts module's calls, reshapes and zeros. Anything else: the block's own
    forward."""

    def __init__(self, block: nn.Module) -> None:
        self.own, self.router, self.experts = block.forward, block.gate, block.experts
        self.hidden: int = block.experts.fused.hidden

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or x.numel() != self.hidden or x.device.type != "cpu":
            return self.own(x)
        out = torch.zeros(x.shape)
        self.add(x, out)
        return out

    def add(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the block's output at x (one token, float32, on the CPU; checked by the caller)."""
        x = x.reshape(1, self.hidden)
        _, weights, index = self.router(x)
        self.experts.add_one_token(x, index, weights, out.view(1, self.hidden))

    def current(self) -> bool:
        return True  # QuantExperts live on the CPU for good


def _moe_forward(block: nn.Module) -> _MoeStep | None:
    """The fused step for a MoE block with exactly `gate` (a router module) and `experts`
    (hetegen's quantized CPU experts, fused), or None."""
    if {name for name, _ in block.named_children()} != {"gate", "experts"}:
        return None
    experts = block.experts
    if getattr(experts, "fused", None) is None or not hasattr(experts, "add_one_token"):
        return None
    return _MoeStep(block) if takes_one_argument(block) else None


def _moe_agrees(step: _MoeStep, gen: torch.Generator) -> bool | None:
    """The step against the block's own forward on a random token (the same router code
    chooses on both sides); None when the block's forward cannot be driven so."""
    x = torch.randn(1, 1, step.hidden, generator=gen)
    try:
        with torch.no_grad():
            return close_enough(step(x), step.own(x).float())
    except Exception:  # a block this form does not describe: left as it is
        return None


#: a pre-norm decoder layer's parts, by transformers' names
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class _LayerStep:
    """A pre-norm decoder layer, h = x + attn(norm1(x)), out = h + mlp(norm2(h)), at one
    token: its fused norms, attention and MLP (or MoE block, _MoeStep) called straight, the
    residual adds inside the kernels (one Python call and four kernel calls where transformers
    makes four module calls and two adds). Anything the fused attention does not take, or parts
    moved since, goes to the layer's own forward. `taken` counts the fused steps."""

    def __init__(self, layer: nn.Module) -> None:
        self.own = layer.forward
        self.attn: _AttentionStep = layer.self_attn.forward
        mlp = layer.mlp.forward
        self.mlp_add: Callable[[torch.Tensor, torch.Tensor], None]
        if isinstance(mlp, _MoeStep):
            self.mlp_add, self.mlp_current = mlp.add, mlp.current
        else:
            self.mlp_add, self.mlp_current = mlp.ffn.first, mlp.current
        self.norms = (layer.input_layernorm.forward.params, layer.post_attention_layernorm.forward.params)
        self.hidden, self.kernels, self.taken = self.attn.hidden, cpu_kernels.kernels(), 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = kwargs.get("hidden_states") if not args else args[0] if len(args) == 1 else None
        ready = self.attn.prepare(x, kwargs)
        if ready is None or not self.mlp_current():
            return self.own(*args, **kwargs)
        (w1, eps1, shift1), (w2, eps2, shift2) = self.norms
        if any(w.dtype is not torch.float32 or w.device.type != "cpu" for w in (w1, w2)):  # moved since
            return self.own(*args, **kwargs)
        x = x.contiguous()
        out, h = x.clone(), torch.empty_like(x)
        self.kernels.rms_norm(x.data_ptr(), w1.data_ptr(), 1, self.hidden, eps1, shift1, h.data_ptr())
        self.attn.run(h, ready, out, add=True)
        self.kernels.rms_norm(out.data_ptr(), w2.data_ptr(), 1, self.hidden, eps2, shift2, h.data_ptr())
        self.mlp_add(h, out)
        self.taken += 1
        return out


def _layer_forward(layer: nn.Module) -> _LayerStep | None:
    """The fused step for a decoder layer made of exactly _LAYER_PARTS, each fused, or None."""
    if {name for name, _ in layer.named_children()} != set(_LAYER_PARTS):
        return None
    attn, mlp = layer.self_attn.forward, layer.mlp.forward
    norms = (layer.input_layernorm.forward, layer.post_attention_layernorm.forward)
    if (
        not isinstance(attn, _AttentionStep)
        or not (hasattr(mlp, "ffn") or isinstance(mlp, _MoeStep))
        or not all(hasattr(n, "params") for n in norms)
    ):
        return None
    return _LayerStep(layer)


class _ModelStep:
    """A decode step of a whole causal LM whose decoder layers are all fused (_LayerStep):
    embedding, rotary, the layers' steps called straight, final norm and LM head, without
    transformers' model-level work (masks, output bookkeeping, module calls). Only one new
    token of a batch of one, with a cache and nothing else asked (no mask, positions, embeddings,
    labels or extra outputs); anything else goes to the model's own forward. Its signature is
    the model's, for callers that inspect it."""

    #: keyword arguments the step takes (with the values it takes them at, None: any)
    TAKES = ("input_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "return_dict")

    def __init__(self, model: nn.Module) -> None:
        self.own, self.base, self.head = model.forward, model.model, model.lm_head
        self.layers = [layer.forward for layer in model.model.layers]
        self.layer_key = cache_key(self.layers[0].own)  # for a layer step that hands over to its own
        self.__signature__ = inspect.signature(self.own)
        self.taken = 0
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.output = CausalLMOutputWithPast
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        self.cache_field = "cache" if "cache" in fields else "past_key_values"  # transformers < 5.2x

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if args or ids is None or cache is None or any(k not in self.TAKES for k in kwargs):
            return self.own(*args, **kwargs)
        if ids.shape != (1, 1) or ids.device.type != "cpu" or kwargs.get("logits_to_keep", 1) != 1:
            return self.own(*args, **kwargs)
        if not kwargs.get("use_cache", True) or not kwargs.get("return_dict", True):
            return self.own(*args, **kwargs)
        past = cache.get_seq_length()
        if past == 0:
            return self.own(*args, **kwargs)
        positions = torch.tensor([[past]])
        h = self.base.embed_tokens(ids)
        rope = self.base.rotary_emb(h, positions)
        for layer in self.layers:
            h = layer(
                h,
                attention_mask=None,
                position_embeddings=rope,
                position_ids=positions,
                use_cache=True,
                **{self.layer_key: cache},
            )
        logits = self.head(self.base.norm(h))
        self.taken += 1
        return self.output(logits=logits, **{self.cache_field: cache})


def _model_forward(model: nn.Module) -> _ModelStep | None:
    """The fused step for a causal LM with `model.embed_tokens`, `rotary_emb`, `layers` (all
    fused), `norm` and an `lm_head`, or None."""
    base = getattr(model, "model", None)
    if not isinstance(base, nn.Module) or not isinstance(getattr(model, "lm_head", None), nn.Module):
        return None
    parts = [getattr(base, n, None) for n in ("embed_tokens", "rotary_emb", "layers", "norm")]
    if not all(isinstance(p, nn.Module) for p in parts):
        return None
    if not len(base.layers) or not all(isinstance(layer.forward, _LayerStep) for layer in base.layers):
        return None
    try:
        return _ModelStep(model)
    except (ImportError, TypeError, ValueError):
        return None


def _model_agrees(step: _ModelStep, two_caches: Callable[[], list], gen: torch.Generator) -> bool | None:
    """Two decode steps of the fused model against its own forward, each on its own cache
    holding the same three-token prompt: True when every step's logits are close, False when
    one is not, None when the fused path was not taken."""
    key = cache_key(step.own)
    vocab = (
        step.base.embed_tokens.num_embeddings if hasattr(step.base.embed_tokens, "num_embeddings") else None
    )
    if not isinstance(vocab, int):
        return None
    caches = two_caches()
    ids = torch.randint(0, vocab, (1, 5), generator=gen)
    try:
        with torch.no_grad():
            for cache in caches:
                step.own(input_ids=ids[:, :3], use_cache=True, **{key: cache})
            for i in range(3, 5):
                want = step.own(
                    input_ids=ids[:, i : i + 1], use_cache=True, logits_to_keep=1, **{key: caches[0]}
                ).logits
                got = step(
                    input_ids=ids[:, i : i + 1], use_cache=True, logits_to_keep=1, **{key: caches[1]}
                ).logits
                if not close_enough(got.float(), want.float()):
                    return False
    except Exception:  # a model this check cannot drive stays as it is
        return None
    if step.taken != 2:
        return None
    step.taken = 0
    return True
