"""hetegen: heterogeneous CPU+GPU inference for LLMs larger than the GPU (HeteGen method)."""

__version__ = "0.1.0"
