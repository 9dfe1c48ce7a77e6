"""The batched decode loop: sampling, stopping at step delimiters, per-sample random generators,
per-sequence KV caches, batched PRM scoring. Knows nothing of which method is running."""
from .kv import KVBatch, RowKV
from .sampling import SamplingParams, distribution, draw, filtered_probs, sample_generator, sample_next
from .steps import (FixedLength, Seq, StepOut, StepStopper, generate_step, reject_candidate, run_rounds,
                    score_steps, score_tokens, stopper_for)

__all__ = ["KVBatch", "RowKV", "SamplingParams", "distribution", "draw", "filtered_probs",
           "sample_generator", "sample_next", "FixedLength", "Seq", "StepOut", "StepStopper",
           "generate_step", "reject_candidate", "run_rounds", "score_steps", "score_tokens", "stopper_for"]
