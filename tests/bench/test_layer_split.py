"""The static layer-split baseline: same greedy tokens as the plain model, CPU layers in the CPU
dtype, CPU layers never moved through the device."""

from __future__ import annotations

import pytest
import torch

from hetegen_cli.bench.layer_split import apply_layer_split, decoder_layers
from hetegen_cli.core.errors import ModelError


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
@pytest.mark.parametrize("gpu_layers", [0, 1, 2])
def test_layer_split_matches_plain_greedy_tokens(fixture, gpu_layers, request):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    apply_layer_split(model, gpu_layers, torch.device("cpu"), torch.float32, torch.float32)
    assert model.hetegen_layer_split == {"gpu_layers": gpu_layers, "cpu_layers": 2 - gpu_layers}
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_layer_split_casts_cpu_layers_to_the_cpu_dtype(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    apply_layer_split(model, 1, torch.device("cpu"), torch.float32, torch.bfloat16)
    layers = decoder_layers(model)
    assert next(layers[0].parameters()).dtype == torch.float32
    assert next(layers[1].parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        out = model(torch.tensor([[5, 6, 7]]))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_decoder_layers_refuses_unknown_models():
    with pytest.raises(ModelError):
        decoder_layers(torch.nn.Linear(2, 2))


def test_layer_split_never_moves_cpu_layers_through_the_device(tiny_opt_dir, monkeypatch):
    """CPU layers must not visit the device while the rest moves (a big model would not fit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()
    cpu_layer = decoder_layers(model)[1]
    seen = []
    original = torch.nn.Module._apply  # .to() recurses into children through _apply

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "_apply", spy)
    apply_layer_split(model, 1, torch.device("cpu"), torch.float32, torch.bfloat16)
    assert model in seen  # the rest moved in one call
    assert decoder_layers(model)[1] is cpu_layer
    assert seen.count(cpu_layer) == 1  # only its own move to the CPU dtype


def test_layer_split_moves_devices_only_and_activations_at_the_boundary(tiny_llama_dir):
    """Rotary tables keep float32 when the weights run in float16, and only the last CPU layer
    hands its output back to the device: consecutive CPU layers pass CPU tensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float16).eval()
    apply_layer_split(model, 0, torch.device("cpu"), torch.float16, torch.bfloat16)
    buffers = {name: b.dtype for name, b in model.named_buffers() if name.endswith("inv_freq")}
    assert buffers and set(buffers.values()) == {torch.float32}
    layers = decoder_layers(model)
    assert [len(layer._forward_hooks) for layer in layers] == [0] * (len(layers) - 1) + [1]
    assert all(p.dtype == torch.bfloat16 for layer in layers for p in layer.parameters())
