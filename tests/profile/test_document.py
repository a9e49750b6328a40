"""The profile document: load, save, validation (pure)."""

from __future__ import annotations

import copy
import json

import pytest

from hetegen_cli.core.errors import ProfileError
from hetegen_cli.profile.document import load_profile, save_profile
from tests.fakes import tiny_profile


@pytest.fixture(scope="module")
def good_doc() -> dict:
    return tiny_profile()


def _write(path, text: str):
    path.write_text(text)
    return path


def test_load_refuses_corrupt_json(tmp_path):
    with pytest.raises(ProfileError) as info:
        load_profile(_write(tmp_path / "p.json", '{"schema_version": 1, "kind": '))
    assert "hetegen profile" in info.value.hint


def test_load_refuses_missing_file(tmp_path):
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "absent.json")


def test_load_refuses_wrong_kind(tmp_path, good_doc):
    doc = dict(good_doc, kind="hetegen.plan")
    with pytest.raises(ProfileError, match=r"hetegen\.profile"):
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))


def test_load_refuses_unknown_schema_version(tmp_path, good_doc):
    doc = dict(good_doc, schema_version=99)
    with pytest.raises(ProfileError, match="99") as info:
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))
    assert "hetegen profile" in info.value.hint


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["cpu"].pop("best_gemv_dtype"), "cpu.best_gemv_dtype"),
        (lambda d: d["cpu"]["gemv"][1].update(weight_bytes_per_s="fast"), "cpu.gemv[1].weight_bytes_per_s"),
        (lambda d: d["cpu"]["gemm"][0].update(flops_per_s=0), "cpu.gemm[0].flops_per_s"),
        (lambda d: d["host"].update(physical_cores=True), "host.physical_cores"),
        (lambda d: d.update(gpu=[]), "gpu"),
        (lambda d: d["cpu"]["memory_read_bytes_per_s"].pop("sd"), "cpu.memory_read_bytes_per_s.sd"),
        (lambda d: d["cpu"].update(best_gemv_dtype="int4"), "cpu.best_gemv_dtype"),
    ],
)
def test_load_names_the_bad_field(tmp_path, good_doc, mutate, field):
    doc = copy.deepcopy(good_doc)
    mutate(doc)
    with pytest.raises(ProfileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_profile(_write(tmp_path / "p.json", json.dumps(doc)))


def test_save_then_load_round_trip(tmp_path, good_doc):
    path = save_profile(good_doc, tmp_path / "sub" / "p.json")
    assert load_profile(path) == json.loads(json.dumps(good_doc))


def test_save_refuses_an_invalid_document_and_writes_nothing(tmp_path, good_doc):
    doc = copy.deepcopy(good_doc)
    doc["cpu"]["gemv"] = []
    with pytest.raises(ProfileError, match=r"cpu\.gemv"):
        save_profile(doc, tmp_path / "out" / "p.json")
    assert not (tmp_path / "out").exists()


# --- measurements with an injected timer ---------------------------------------------------
