"""The one dtype table."""

from __future__ import annotations

from hetegen_cli.core import dtypes


def test_safetensors_codes_round_trip_and_sizes():
    for name, d in dtypes.DTYPES.items():
        assert dtypes.from_safetensors(d.safetensors) == name
        assert dtypes.to_safetensors(name) == d.safetensors
    assert dtypes.itemsize("bfloat16") == 2 and dtypes.itemsize("float32") == 4
    assert dtypes.from_safetensors("F8_E4M3") is None
    assert set(dtypes.WEIGHT_DTYPES) <= set(dtypes.DTYPES)


def test_greedy_tolerance_is_the_loosest_of_the_labels():
    assert dtypes.greedy_tolerance("float32") == 1e-3
    assert dtypes.greedy_tolerance("float16+bfloat16", "float32") == 5e-2
    assert dtypes.greedy_tolerance("float16", "float32") == 2e-2
    assert dtypes.greedy_tolerance(None) == 5e-2  # unknown: the loosest floating tolerance


def test_compute_formats_render_the_label_people_read():
    assert dtypes.ComputeFormats("float32").label == "float32"
    assert dtypes.ComputeFormats("float16", ("float32", "float32")).label == "float16+float32"
    assert dtypes.ComputeFormats("float32", ("bfloat16", "float32")).label == "float32+bfloat16"
    assert dtypes.ComputeFormats("bfloat16", quant="int4").label == "int4+bfloat16"
    assert dtypes.ComputeFormats("bfloat16", ("float32", "float32"), "int8").label == "int8+bfloat16+float32"
