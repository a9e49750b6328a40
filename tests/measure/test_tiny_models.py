"""The engine-cost measurement's tiny models (measure.tiny_models)."""

from __future__ import annotations

from hetegen_cli.measure.tiny_models import ARCHITECTURES, TinyShape, write_tiny_model

SHAPE = TinyShape(hidden=32, heads=2, intermediate=64, vocab=64, layers=(1, 2), max_positions=64)


def test_write_tiny_model_gives_a_loadable_model_of_each_family(tmp_path):
    for arch in ARCHITECTURES:
        ref = write_tiny_model(tmp_path / arch, arch, SHAPE, 2)
        assert ref.spec.num_layers == 2 and ref.spec.hidden_size == 32
        assert not ref.spec.tie_word_embeddings  # the LM head is a linear the engine can place
