"""Batched autoregressive decoding over rows of different lengths, with one KV cache per batch.

Rows are left-padded; position ids come from the attention mask, so a row's logits do not depend on
how much padding its batch needed. A finished row leaves the batch (its cache rows are dropped), so
nobody pays for it. Wall time of each forward is split evenly among the rows it served, and every
processed token is charged to its row's ledger with the cost model's FLOPs.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ledger import RoleCost
from ..models import LoadedModel
from .sampling import SamplingParams, sample_next


@dataclass
class Row:
    prompt_ids: list[int]
    generator: torch.Generator
    cost: RoleCost
    max_new_tokens: int
    new_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # eos | max_tokens | stop
    finished_at: float = 0.0  # time.perf_counter() when the row stopped


def cache_kwarg(model) -> str:
    """transformers 5.2x renames `past_key_values` to `cache`; 4.x knows only the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(lm: LoadedModel, rows: list[Row], params: SamplingParams,
             stop: Optional[Callable[[Row], bool]] = None) -> None:
    """Decode every row until EOS, its token limit, or `stop(row)` says so; fills the rows in place."""
    from transformers import DynamicCache

    if not rows:
        return
    model = lm.model
    ids, mask = _left_pad([r.prompt_ids for r in rows], lm.pad_id, lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    kw = cache_kwarg(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{kw: cache})
    lm.synchronize()
    elapsed = time.perf_counter() - t0
    total = sum(len(r.prompt_ids) for r in rows)
    for r in rows:
        r.cost.add_prefill(lm.cost, len(r.prompt_ids), 0)
        r.cost.seconds += elapsed * len(r.prompt_ids) / total
    active = list(range(len(rows)))
    next_pos = positions[:, -1] + 1
    logits = out.logits[:, -1]
    while True:
        tokens = sample_next(logits, params, [rows[i].generator for i in active])
        now = time.perf_counter()
        keep = []
        for j, (i, tok) in enumerate(zip(active, tokens)):
            r = rows[i]
            r.new_ids.append(tok)
            r.cost.generated_tokens += 1
            if tok in lm.eos_ids:
                r.finish_reason = "eos"
            elif stop is not None and stop(r):
                r.finish_reason = "stop"
            elif len(r.new_ids) >= r.max_new_tokens:
                r.finish_reason = "max_tokens"
            if r.finish_reason:
                r.finished_at = now
            else:
                keep.append(j)
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=lm.device)
            cache.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            active = [active[j] for j in keep]
            tokens = [tokens[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor(tokens, device=lm.device)[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], use_cache=True, **{kw: cache})
        lm.synchronize()
        share = (time.perf_counter() - t0) / len(active)
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
        for i in active:
            r = rows[i]
            r.cost.add_decode(lm.cost, len(r.prompt_ids) + len(r.new_ids) - 1)
            r.cost.seconds += share
