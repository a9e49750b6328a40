"""Counting a MoE model's routing choices (measure.expert_use) and the document they go into
(profile.expert_use), on tiny random transformers MoE models.

The counts are checked against transformers' own router logits (`output_router_logits=True`):
top-k of their softmax, per token, counted once over the windows eval scores.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hetegen_cli.core.errors import InputError
from hetegen_cli.measure.expert_use import ExpertCounter, routers
from hetegen_cli.profile.expert_use import ExpertUse, LayerUse, load_expert_use, save_expert_use
from hetegen_cli.run.evaluate import perplexity, windows

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)
TINY_MOE = {
    "qwen3_moe": dict(_COMMON, num_experts=6, moe_intermediate_size=24, intermediate_size=48, head_dim=8),
    "mixtral": dict(_COMMON, num_local_experts=4, intermediate_size=24),
    "olmoe": dict(_COMMON, num_experts=8, intermediate_size=24),
    "qwen2_moe": dict(
        _COMMON,
        num_experts=4,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        intermediate_size=48,
    ),
}


def _model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY_MOE[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def _reference_counts(model, ids: list[int], num_experts: int, top_k: int) -> dict[int, list[int]]:
    """Per layer, the experts transformers' routers choose for each token of `ids` (one pass)."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
    counts = {}
    for layer, logits in enumerate(out.router_logits):
        chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices
        counts[layer] = torch.bincount(chosen.reshape(-1), minlength=num_experts).tolist()
    return counts


@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_counts_equal_the_routers_choices_each_token_once(model_type):
    model = _model(model_type)
    ids = [int(i) for i in torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(1))]
    counter = ExpertCounter(model)
    assert sorted(counter.routers) == [0, 1]
    built = SimpleNamespace(model=model, device=torch.device("cpu"))
    # windows of 16 tokens every 8 (eval's default overlap): each token still counted once
    with counter:
        perplexity(built, ids, 16, 8, experts=counter)
    assert counter.tokens == len(ids)
    # causal attention: a token's routing depends only on the tokens before it in its window, so
    # count the reference the same way: each token in the window eval first counts it in
    want = {layer: [0] * counter.num_experts for layer in counter.routers}
    for start, end, scored in windows(len(ids), 16, 8):
        skip = 0 if start == 0 else scored - start
        shape = (counter.num_experts, counter.top_k)
        window = _reference_counts(model, ids[start:end], *shape)
        none = {layer: [0] * counter.num_experts for layer in want}
        before = _reference_counts(model, ids[start : start + skip], *shape) if skip else none
        for layer in want:
            already = before[layer]
            want[layer] = [w + a - b for w, a, b in zip(want[layer], window[layer], already, strict=True)]
    assert {i: counter.counts[i].tolist() for i in counter.routers} == want
    for layer in counter.layers():  # what the document checks
        assert sum(layer["counts"]) == len(ids) * counter.top_k
    with torch.inference_mode():  # the hooks are gone on exit: another forward counts nothing
        model(input_ids=torch.tensor([ids[:8]]), use_cache=False)
    assert sum(int(c.sum()) for c in counter.counts.values()) == 2 * len(ids) * counter.top_k


def test_a_dense_model_has_no_router():
    config = AutoConfig.for_model("llama", **{k: v for k, v in _COMMON.items() if k != "num_experts_per_tok"})
    assert routers(AutoModelForCausalLM.from_config(config)) == {}
    with pytest.raises(ValueError, match="no mixture-of-experts router"):
        ExpertCounter(AutoModelForCausalLM.from_config(config))


def _use(**over) -> dict:
    doc = dict(
        model="tiny",
        architecture="qwen3_moe",
        config_hash="abc",
        num_experts=4,
        top_k=2,
        tokens=3,
        text="hetegen eval text",
        text_sha256="00",
        layers=[{"layer": 0, "counts": [3, 1, 2, 0]}, {"layer": 1, "counts": [0, 0, 3, 3]}],
    )
    doc.update(over)
    return doc


def test_the_document_round_trips_and_gives_probabilities(tmp_path):
    use = ExpertUse(**_use())
    path = save_expert_use(use, tmp_path / "use.json")
    back = load_expert_use(path)
    assert back == use
    assert back.probabilities(0) == [1.0, 1 / 3, 2 / 3, 0.0]  # sums to top_k
    assert back.probabilities(5) == [0.5] * 4  # a layer not measured: uniform top_k / E


@pytest.mark.parametrize(
    "over, text",
    [
        ({"top_k": 5}, "exceeds num_experts"),
        ({"layers": [{"layer": 0, "counts": [3, 1, 2]}]}, "3 counts for 4 experts"),
        ({"layers": [{"layer": 0, "counts": [3, 1, 2, 1]}]}, "not tokens x top_k"),
        ({"layers": [{"layer": 0, "counts": [3, 1, 2, 0]}] * 2}, "appears twice"),
        ({"tokens": 1, "layers": [{"layer": 0, "counts": [2, 0, 0, 0]}]}, "counted 2 times in 1 tokens"),
        ({"layers": [{"layer": 0, "counts": [3, -1, 4, 0]}]}, "counts"),
        ({"kind": "hetegen.profile"}, "not a hetegen.expert_use document"),
    ],
)
def test_a_bad_document_is_one_clear_error(tmp_path, over, text):
    path = tmp_path / "use.json"
    path.write_text(json.dumps({"schema_version": 1, "kind": "hetegen.expert_use", **_use(**over)}))
    with pytest.raises(InputError, match=text) as info:
        load_expert_use(path)
    assert info.value.hint


def test_layer_use_is_typed():
    with pytest.raises(ValueError):
        LayerUse(layer=0, counts=["1"])
