"""Token sampling with one random generator per sample and role.

A sample's draws come only from its own generator (seeded from the run seed, the sample id, its
index and the role), so its output does not depend on the batch size, the shard layout or which
other problems share its batch. Each sampled token consumes exactly one uniform draw (inverse CDF).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sample_generator(seed: int, sample_id: str, sample_index: int, role: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x1f{sample_id}\x1f{sample_index}\x1f{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in float32 (rows of `logits`)."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from, [B, V] float32 on the CPU (one-hot when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float().cpu()
    return filtered_probs(logits, params).cpu()


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a distribution [V] with one uniform of `generator` (inverse CDF)."""
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` [B, V], each row drawn with its own generator."""
    if params.greedy:
        return logits.argmax(-1).tolist()
    probs = filtered_probs(logits, params).cpu()
    return [draw(probs[row], gen) for row, gen in zip(range(probs.shape[0]), generators)]
