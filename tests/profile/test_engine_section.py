"""The profile's `engine` section (schema 2) and older profiles (schema 1)."""

from __future__ import annotations

import json

import pytest

from hetegen_cli.core.errors import ProfileError
from hetegen_cli.profile.document import PROFILE_SCHEMA_VERSION, load_profile, validate_profile
from tests.fakes import make_profile
from tests.plan.engine_fakes import with_engine


def test_schema_1_profiles_still_load_without_engine_costs(tmp_path):
    old = make_profile(gpu=False)
    assert old["schema_version"] == 1 and "engine" not in old
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert load_profile(path).get("engine") is None
    assert PROFILE_SCHEMA_VERSION == 2


def test_schema_2_engine_costs_validate_and_bad_ones_name_the_field(tmp_path):
    doc = with_engine(make_profile(gpu=False))
    validate_profile(doc)
    bad = json.loads(json.dumps(doc))
    bad["engine"]["entries"][0]["decode"][0]["layer_s"] = -1.0
    with pytest.raises(ProfileError, match=r"engine\.entries\[0\]\.decode\[0\]\.layer_s"):
        validate_profile(bad)
    bad = json.loads(json.dumps(doc))
    bad["engine"]["entries"][0]["device"] = "tpu"
    with pytest.raises(ProfileError, match="device"):
        validate_profile(bad)
