"""The typed sections of a plan document (pure Python, no torch).

Each section is defined once, here: the planner builds these objects, `Plan.to_dict` writes
them, and plan.load validates a file against the very same types (a field is written once).
Sizes in bytes, times in seconds, rates in bytes/s. `Section.to_dict()` writes the fields
that were given, so an optional figure the planner did not compute stays out of the JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from hetegen_cli.core.validation import Count, Finite, Flag, Index, NonNegative, Positive, Schema, Text

WeightDtype = Literal["float32", "bfloat16", "float16"]
#: ModelSpec.quant_label: one format, or a mixed model's (a GGUF Q4_K_M: int4 and int8 linears)
QuantLabel = Literal[
    "int8", "int4-g32", "int4-g64", "int4-g128", "int4-g32+int8", "int4-g64+int8", "int4-g128+int8"
]


class Section(Schema):
    """A plan section: validated like any document read from disk (core.validation)."""

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class ModelIdentity(Section):
    """Which model a plan was made for (checked against the model before it runs)."""

    name: Text
    architecture: Text
    dtype: WeightDtype
    config_hash: Text
    arg: Text = ""
    num_layers: Index | None = None
    hidden_size: Index | None = None
    linear_count: Index | None = None
    tie_word_embeddings: Flag | None = None
    weight_bytes: Index | None = None
    quant: QuantLabel | None = None


class ProfileIdentity(Section):
    """The profile a plan or prediction used (profile.document.identity)."""

    path: Text | None = None
    created_utc: Text | None = None
    cpu_model: Text | None = None
    gpu_name: Text | None = None
    quick: Flag | None = None
    sha256: Text | None = None


class Workload(Section):
    """What the plan is made for: tokens per sequence and sequences per step."""

    prompt_len: Index
    max_new_tokens: Index
    batch_size: Count
    prefill_tokens: Index | None = None
    decode_tokens: Index | None = None
    context_tokens: Index | None = None


class Budget(Section):
    """The memory the plan may use and where each limit came from."""

    gpu_budget_bytes: Index | None = None
    gpu_budget_source: Text | None = None
    gpu_minimum_bytes: Index | None = None
    gpu_unused_bytes: Index | None = None
    cpu_budget_bytes: Index | None = None
    cpu_budget_source: Text | None = None


class GpuMemory(Section):
    """GPU bytes by item (plan.memory's model; the engine allocates exactly these)."""

    reserve_bytes: Index = 0
    fixed_bytes: Index = 0
    kv_cache_bytes: Index = 0
    workspace_bytes: Index = 0
    dequant_bytes: Index | None = None  # quantized models: the dequantized share's workspace
    lm_head_bytes: Index = 0
    staging_bytes: Index = 0
    resident_linear_bytes: Index = 0
    resident_expert_bytes: Index | None = None  # MoE models: the routed experts on the GPU side
    expert_staging_bytes: Index | None = None  # MoE models: prefill streaming's two expert buffers
    total_bytes: Index = 0

    @classmethod
    def nothing(cls) -> GpuMemory:
        """An all-CPU plan's: every item 0 (written out)."""
        optional = ("dequant_bytes", "resident_expert_bytes", "expert_staging_bytes")
        names = [n for n in cls.model_fields if n not in optional]
        return cls(**dict.fromkeys(names, 0))


class HostMemory(Section):
    """Host bytes: the split linears' arena, copies in other CPU dtypes, the routed experts the
    CPU computes (MoE models), everything else."""

    weights_bytes: Index = 0
    cpu_copy_bytes: Index = 0
    other_bytes: Index = 0
    expert_bytes: Index | None = None
    total_bytes: Index = 0


class MemoryUse(Section):
    """GPU and host memory of a plan (None in plans made from fractions: not computed)."""

    gpu: GpuMemory | None = None
    host: HostMemory | None = None


class LinearTimes(Section):
    """Predicted seconds of one linear in one phase at the plan's split (costmodel.ShareTimes)."""

    cpu_s: NonNegative
    transfer_s: NonNegative
    gpu_s: NonNegative
    layer_s: NonNegative


class PhaseSeconds(Section):
    """A time per phase: the prefill step, and one decode step (one token per sequence)."""

    prefill_s: Finite
    decode_s_per_token: Finite

    def seconds(self, phase: str) -> float:
        """The time of `phase` ("prefill", or "decode": one decode step)."""
        return self.prefill_s if phase == "prefill" else self.decode_s_per_token


class FixedPart(PhaseSeconds):
    """The engine's fixed costs in a prediction (profile `engine` section), with the part before
    a calibration's factors (`uncalibrated`, present when a calibration was applied)."""

    calibrated: Flag = False
    uncalibrated: PhaseSeconds | None = None


class HostPart(PhaseSeconds):
    """The engine's host time added to a prediction by trace replay (plan --simulate)."""

    source: Text = ""


class Figures(PhaseSeconds):
    """One strategy's predicted step times. end-to-end = generated tokens / (prefill +
    (max_new_tokens - 1) decode steps). `linear` (the bandwidth model: linears, LM head and
    the attention the fixed costs do not cover) + `fixed` (the engine's fixed costs) = the
    step time, when the profile has fixed costs; both absent otherwise."""

    prefill_s: NonNegative
    decode_s_per_token: NonNegative
    decode_tokens_per_s: Positive | None
    end_to_end_tokens_per_s: Positive | None
    total_s: NonNegative
    gpu_memory_bytes: Index
    hetegen_decode_speedup: Positive | None = None  # this strategy's decode time / hetegen's
    hetegen_end_to_end_speedup: Positive | None = None
    gpu_layers: Index | None = None  # layer_split: decoder layers whole on the GPU
    lm_head_on_gpu: Flag | None = None  # layer_split
    linear: PhaseSeconds | None = None
    fixed: FixedPart | None = None
    host: HostPart | None = None  # plan --simulate: the engine's host time from the trace replay


STRATEGIES = ("hetegen", "offload", "layer_split", "cpu_only")
Strategy = Literal["hetegen", "offload", "layer_split", "cpu_only"]


class Predictions(Section):
    """Every strategy's figures for the plan's workload (None: not possible on this machine,
    e.g. offload without a GPU; all None in plans made from fractions)."""

    hetegen: Figures | None = None
    offload: Figures | None = None
    layer_split: Figures | None = None
    cpu_only: Figures | None = None

    def items(self) -> Iterator[tuple[str, Figures]]:
        """(strategy, figures) of every strategy that has figures, in STRATEGIES order."""
        for key in STRATEGIES:
            fig = getattr(self, key)
            if fig is not None:
                yield key, fig


class Bounds(Section):
    """docs/method.md §11: per-token time >= W_gpu / B_hbm + W_host / X, per strategy."""

    w_gpu_bytes: Index
    w_host_bytes: Index
    b_cpu_bytes_per_s: NonNegative
    b_dram_bytes_per_s: NonNegative
    b_hbm_bytes_per_s: NonNegative | None = None
    b_pcie_bytes_per_s: NonNegative | None = None
    cpu_only_s_per_token: NonNegative | None = None
    offload_s_per_token: NonNegative | None = None
    layer_split_s_per_token: NonNegative | None = None
    hybrid_s_per_token: NonNegative | None = None
    bound_s_per_token: NonNegative
    plan_fraction_of_bound: NonNegative | None = None


class Residency(Section):
    """How the resident set was chosen."""

    priority: Text
    phase: Text
    order: Text
    resident_count: Index
    split_count: Index


class FormatChoice(Section):
    """How the CPU share's format per phase was chosen (plan.formats)."""

    prefill: WeightDtype
    decode: WeightDtype
    forced: Flag = False
    tolerance: NonNegative | None = None
    reason: Text = ""
    considered: list[dict[str, Any]] = Field(default_factory=list)


class RatesRecord(Section):
    """The fitted hardware constants the plan used (costmodel.Rates as JSON), per phase and per
    quantized format."""

    prefill: dict[str, Any]
    decode: dict[str, Any]
    quant: dict[str, dict[str, Any]] | None = None


class ExpertUseRecord(Section):
    """Which expert-use statistics placed a mixture-of-experts plan's experts and priced them
    (plan.expert_use): `uniform` (top_k / E per token) or `measured` (the counts of `hetegen
    eval --expert-use FILE`: the file, its sha256 and what it counted). Absent in older plans."""

    source: Literal["uniform", "measured"]
    path: Text | None = None
    sha256: Text | None = None  # of the file's bytes
    model: Text | None = None  # the model it was counted on
    config_hash: Text | None = None
    tokens: Count | None = None  # tokens counted
    text: Text | None = None  # the text they came from
    text_sha256: Text | None = None
