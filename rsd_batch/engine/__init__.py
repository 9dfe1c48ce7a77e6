"""The batched decode loop: sampling, stopping, per-sample random generators, KV caches."""
from .decode import Row, generate
from .sampling import SamplingParams, sample_generator, sample_next

__all__ = ["Row", "generate", "SamplingParams", "sample_generator", "sample_next"]
