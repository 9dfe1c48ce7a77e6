"""The batched decode loop: sampling, stopping at step delimiters, per-sample random generators,
batched PRM scoring, on one of two backends: `hf` (this project's loop, per-sequence KV caches)
and `vllm` (vLLM's offline engines, prefix caching). Knows nothing of which method is running."""
from .kv import KVBatch, RowKV
from .sampling import SamplingParams, distribution, draw, filtered_probs, sample_generator, sample_next
from .steps import (FixedLength, Seq, StepOut, StepStopper, generate_step, generate_steps, length_groups, prm_chunks,
                    reject_candidate, run_rounds, score_steps, score_tokens, stopper_for)

__all__ = ["KVBatch", "RowKV", "SamplingParams", "distribution", "draw", "filtered_probs",
           "sample_generator", "sample_next", "FixedLength", "Seq", "StepOut", "StepStopper",
           "generate_step", "generate_steps", "length_groups", "prm_chunks", "reject_candidate", "run_rounds",
           "score_steps", "score_tokens", "stopper_for"]
