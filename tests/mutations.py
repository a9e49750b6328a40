"""Hypothesis strategies that damage valid JSON documents the way files get damaged: fields
dropped, values of the wrong type, NaN, infinities, negatives, huge numbers, lists cut short.

The property tests built on them assert that hetegen either accepts a damaged document or
refuses it with its own error; never anything else (docs/validation.md).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def property_settings(max_examples: int) -> settings:
    """What the property tests run in CI: `max_examples` damaged documents, deterministic (the
    same ones every run), no example database left behind."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


WEIRD_VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    7,
    2**31,
    2**53 + 1,
    2**63,
    10**30,
    10**400,
    0.0,
    -0.0,
    0.5,
    -1.5,
    1e-300,
    1e300,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "1",
    "NaN",
    "float16",
    "int8",
    [],
    [1],
    [1, 2],
    [[1]],
    {},
    {"a": 1},
]


def node_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) to a value inside `tree`, the root excluded."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.append((*prefix, key))
            found.extend(node_paths(value, (*prefix, key)))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found.append((*prefix, i))
            found.extend(node_paths(value, (*prefix, i)))
    return found


def _parent(tree: Any, path: tuple) -> Any:
    for step in path[:-1]:
        tree = tree[step]
    return tree


def _nearby(value: Any) -> st.SearchStrategy:
    """Values of the same kind as `value` that are out of its range."""
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, 1, "true"])
    if isinstance(value, (int, float)):
        try:
            big = float(value) * 1e300 if value else 1e300
        except OverflowError:  # an int beyond any float
            big = math.inf
        return st.sampled_from([-value, big, value - 1, -1, 0, big + 0.5, math.nan, str(value)])
    if isinstance(value, str):
        return st.sampled_from(["", value * 2, value.upper(), " " + value, 1])
    if isinstance(value, list):
        return st.sampled_from([value[:-1], value[:1], value * 2, [None] * len(value), {}])
    if isinstance(value, dict):
        return st.sampled_from([{}, list(value.values()), None])
    return st.sampled_from(WEIRD_VALUES)


@st.composite
def mutated(draw: st.DrawFn, doc: Any, max_edits: int = 3) -> Any:
    """A deep copy of `doc` with 1..max_edits edits: delete, replace (weird or nearby value),
    duplicate into a list, or replace the whole document."""
    doc = copy.deepcopy(doc)
    if draw(st.integers(0, 40)) == 0:
        return copy.deepcopy(draw(st.sampled_from(WEIRD_VALUES)))
    for _ in range(draw(st.integers(1, max_edits))):
        paths = node_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(doc, path), path[-1]
        op = draw(st.sampled_from(["delete", "weird", "nearby", "nearby", "duplicate"]))
        if op == "delete":
            del parent[key]
        elif op == "weird":  # copies: the pool's lists and dicts must never be edited
            parent[key] = copy.deepcopy(draw(st.sampled_from(WEIRD_VALUES)))
        elif op == "nearby":
            parent[key] = copy.deepcopy(draw(_nearby(parent[key])))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = [copy.deepcopy(parent[key])]
    return doc
