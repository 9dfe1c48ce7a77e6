"""The HF backend: this project's own decode loop over Hugging Face models (the CPU reference).

Each sequence keeps its own KV cache per model (engine/kv.py); a batched forward feeds each row only
the tokens its cache lacks, so no model re-processes a prefix. The ledger counts exactly what each
forward computes.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .kv import KVBatch
from .sampling import SamplingParams, distribution, draw, sample_next
from .steps import Ahead, Seq, StepOut, length_groups, prm_chunks


def _feed_chunks(lm, seqs: list[Seq], extra: Optional[list[list[int]]] = None, logits_to_keep: int = 1):
    """Batch the rows and run each one's uncached tokens (plus `extra` ones) through `lm`.

    Charges each row's ledger: tokens the model wrote itself and never fed count as decode,
    everything else as prefill; the forward's time is split by tokens.
    """
    role = lm.role
    caches = [s.cache(role) for s in seqs]
    chunks = [s.context(role)[c.length:] + (extra[i] if extra else []) for i, (s, c) in enumerate(zip(seqs, caches))]
    batch = KVBatch(lm.model, lm.device, lm.pad_id, caches, chunks)
    t0 = time.perf_counter()
    out = batch.forward_chunk(logits_to_keep=logits_to_keep)
    lm.synchronize()
    elapsed = time.perf_counter() - t0
    total = sum(len(c) for c in chunks)
    for s, c, chunk in zip(seqs, caches, chunks):
        cost = s.ledger.role(role)
        own = 1 if s.last_writer == role and not extra else 0  # its own last token, as a decode would
        cost.add_prefill(lm.cost, len(chunk) - own, c.length, logits_to_keep)
        if own:
            cost.add_decode(lm.cost, c.length + len(chunk) - 1)
        cost.seconds += elapsed * len(chunk) / total
    return batch, out, caches, chunks


def generate_step(lm, seqs: list[Seq], params: SamplingParams, stopper, keep_probs: bool = False,
                  ahead: Optional[list[bool]] = None) -> list[StepOut]:
    """Every row first feeds the tokens its cache lacks (its chunk); rows then sample until their own
    step ends, EOS or their budget, and leave the batch with their cache. A row allowed `ahead` goes
    on into its next step until the last row's step ends; that step is kept as `seq.ahead`."""
    return [steps[0] for steps in _decode(lm, seqs, params, stopper, [1] * len(seqs), keep_probs, ahead)]


def generate_steps(lm, seqs: list[Seq], params: SamplingParams, stopper, max_steps: list[int]
                   ) -> list[list[StepOut]]:
    """The rest of each solution in one batched decode: a row goes on past its step ends (up to
    `max_steps`), so the batch is not re-gathered at every step; it leaves at EOS or its budget."""
    return _decode(lm, seqs, params, stopper, max_steps)


# Rows far behind read apart, by length, when one padded batch would waste more than CATCH_UP_WASTE of
# the work, CATCH_UP_TOKENS padded tokens per forward: the target's prefill is compute-bound, so
# padding costs time (1.1 / 1024 instead of 2.0 / 8192: the toy world's target 2.15 -> 1.75 s in RSD).
CATCH_UP_WASTE = 1.1
CATCH_UP_TOKENS = 1024


def _prefill_groups(owner, backbone, pad_id: int, seqs: list[Seq], chunks: list[list[int]], max_batch_tokens: int,
                    read=None) -> None:
    """Each row reads its chunk in backbone forwards (hidden states only), rows grouped by length under
    a padded-token budget; each is charged a prefill without logits and its share of the time, and
    keeps its longer cache. `read(batch, hidden, group)` sees a group's output first (the PRM's rewards).
    `owner` is the loaded model or PRM whose role, cost model and device these are."""
    role = owner.role
    for group in length_groups([len(c) for c in chunks], max_batch_tokens):
        rows = [seqs[i] for i in group]
        caches = [s.cache(role) for s in rows]
        batch = KVBatch(backbone, owner.device, pad_id, caches, [chunks[i] for i in group])
        t0 = time.perf_counter()
        hidden = batch.forward_chunk().last_hidden_state
        if read is not None:
            read(batch, hidden, group)  # ends with .cpu(), which waits for the GPU
        else:
            owner.synchronize()
        elapsed = time.perf_counter() - t0
        total = sum(len(chunks[i]) for i in group)
        for b, (i, s, c) in enumerate(zip(group, rows, caches)):
            cost = s.ledger.role(role)
            cost.add_prefill(owner.cost, len(chunks[i]), c.length, logits=0)
            cost.seconds += elapsed * len(chunks[i]) / total
            s.kv[role] = batch.extract(b)


def _catch_up(lm, seqs: list[Seq]) -> None:
    """Rows far behind (a new prompt, the other model's step) first read all but their last token, in
    backbone forwards grouped by length, when one batch padded to the longest would do more than
    CATCH_UP_WASTE times the work; the decode then feeds each such row one token. Same tokens, same
    ledger, less padding."""
    role = lm.role
    lengths = [len(s.context(role)) - s.cache(role).length for s in seqs]
    if max(lengths) * len(seqs) <= CATCH_UP_WASTE * sum(lengths):
        return
    behind = [s for s, n in zip(seqs, lengths) if n > 1]
    _prefill_groups(lm, getattr(lm.model, lm.model.base_model_prefix), lm.pad_id, behind,
                    [s.context(role)[s.cache(role).length:-1] for s in behind], CATCH_UP_TOKENS)


@torch.inference_mode()
def _decode(lm, seqs: list[Seq], params: SamplingParams, stopper, max_steps: list[int],
            keep_probs: bool = False, ahead: Optional[list[bool]] = None) -> list[list[StepOut]]:
    """Row i writes `max_steps[i]` steps (fewer at EOS or its budget), starting from the step it
    began ahead in an earlier call, if any. With `ahead[i]` it may then begin one more step while other
    rows finish theirs: the call returns once no row has a step it was asked for left to write."""
    role = lm.role
    extra = [1 if ahead and ahead[i] else 0 for i in range(len(seqs))]
    outs, rng, pre = [], [None] * len(seqs), []
    for s in seqs:  # a step begun ahead is where the row starts (and no longer ahead)
        a = s.ahead_of(role)
        outs.append([StepOut(list(a.step.tokens), a.step.reason)] if a else [StepOut([], "")])
        pre.append(len(a.step.tokens) if a else 0)
    made = [0] * len(seqs)  # tokens each row has sampled in this call
    room = [s.left - p for s, p in zip(seqs, pre)]  # tokens each row may still sample
    costs = [s.ledger.role(role) for s in seqs]

    def goes_on(i: int) -> bool:
        """After a token: does row i stay in the batch (and open a new step if its step just ended)?"""
        s, o = seqs[i], outs[i][-1]
        if o.reason in ("eos", "budget") or made[i] >= room[i]:
            return False
        if not o.reason:
            return True
        if len(outs[i]) >= max_steps[i] + extra[i]:
            return False
        if len(outs[i]) == max_steps[i]:  # the step past the asked ones: it can be taken back
            rng[i] = s.generators[role].get_state()
        outs[i].append(StepOut([], ""))
        return True

    def asked(i: int) -> bool:
        """Row i still has a step it was asked for to write."""
        return len(outs[i]) < max_steps[i] or (len(outs[i]) == max_steps[i] and not outs[i][-1].reason)

    def finish() -> list[list[StepOut]]:
        for i, s in enumerate(seqs):
            if s.ahead_of(role):
                s.ahead = None  # taken over by outs[i]
            if len(outs[i]) > max_steps[i]:
                step = outs[i].pop()
                if step.tokens:
                    s.ahead = Ahead(role, step, rng[i])
        return outs

    # rows whose step begun ahead is complete and that may not go on need no forward
    rows = [i for i, s in enumerate(seqs) if not outs[i][0].reason or goes_on(i)]
    if not any(asked(i) for i in rows):
        for i in rows:  # went on for nothing: nothing sampled, no step to keep
            if not outs[i][-1].tokens and len(outs[i]) > 1:
                outs[i].pop()
        return finish()
    asking = {i for i in rows if asked(i)}  # the call lasts while a row has an asked step left
    sub = [seqs[i] for i in rows]
    _catch_up(lm, sub)
    batch, out, caches, chunks = _feed_chunks(lm, sub)
    vocab = lm.vocab_limit  # ids every model sharing the sequence can embed: never sample past them
    logits = out.logits[:, -1, :vocab]
    while True:
        live = [rows[r] for r in batch.rows]
        if keep_probs:
            probs = distribution(logits, params)
            tokens = [draw(probs[b], seqs[i].generators[role]) if not params.greedy else int(probs[b].argmax())
                      for b, i in enumerate(live)]
        else:
            tokens = sample_next(logits, params, [seqs[i].generators[role] for i in live])
        keep = []
        for b, (i, tok) in enumerate(zip(live, tokens)):
            s, o = seqs[i], outs[i][-1]
            o.tokens.append(tok)
            made[i] += 1
            if keep_probs:
                o.probs.append(probs[b])
            costs[i].generated_tokens += 1
            if tok in lm.eos_ids:
                o.reason = "eos"
            elif stopper.done(o.tokens):
                o.reason = "step"
            elif made[i] >= room[i]:
                o.reason = "budget"
            if goes_on(i):
                keep.append(b)
            else:
                s.kv[role] = batch.extract(b)
                asking.discard(i)
            if o.reason and i in asking and not asked(i):
                asking.discard(i)
        if not asking:
            for b in keep:  # rows drafting ahead leave too, with what they have written so far
                i = live[b]
                seqs[i].kv[role] = batch.extract(b)
                if not outs[i][-1].tokens:  # its step had just ended: nothing begun yet
                    outs[i].pop()
            # What this step held at its peak: the batch's cache, the rows' caches it was gathered
            # from, and the caches extracted from it (the memory plan's HF_KV_COPIES bounds this).
            held = batch.nbytes() + sum(c.nbytes() for c in caches) + sum(s.kv[role].nbytes() for s in sub)
            lm.kv_peak_bytes = max(lm.kv_peak_bytes, held)
            return finish()
        fed = [tokens[b] for b in batch.keep(keep)]
        t0 = time.perf_counter()
        out = batch.forward_next(fed)
        lm.synchronize()
        share = (time.perf_counter() - t0) / len(keep)
        logits = out.logits[:, -1, :vocab]
        for r in batch.rows:
            i = rows[r]
            # The token just fed attends to the cache it found plus itself.
            costs[i].add_decode(lm.cost, caches[r].length + len(chunks[r]) + made[i] - 1)
            costs[i].seconds += share


@torch.inference_mode()
def score_tokens(lm, seqs: list[Seq], proposals: list[list[int]]) -> list[torch.Tensor]:
    """One forward: each row feeds what its cache lacks plus its proposal. Afterwards the row's cache
    covers the proposal."""
    n = max(len(p) for p in proposals) + 1
    batch, out, _, _ = _feed_chunks(lm, seqs, extra=proposals, logits_to_keep=n)
    logits = out.logits[..., :lm.vocab_limit].float()
    result = []
    for b, (s, p) in enumerate(zip(seqs, proposals)):
        s.kv[lm.role] = batch.extract(b)
        result.append(logits[b, n - len(p) - 1:].cpu())
    return result


@torch.inference_mode()
def score_steps(prm, seqs: list[Seq], candidates: list[str], max_batch_tokens: int) -> list[float]:
    """Rows are grouped by chunk length under a token budget per forward; each row's PRM cache then
    holds the candidate too."""
    rows = prm_chunks(prm, seqs, candidates)
    rewards = [0.0] * len(seqs)

    def read(batch, hidden, group):
        picked = torch.stack([hidden[b, batch.width - len(rows[i][0]) + rows[i][1]] for b, i in enumerate(group)])
        for i, r in zip(group, prm.adapter.rewards_from_hidden(picked).float().cpu().tolist()):
            rewards[i] = r

    _prefill_groups(prm, prm.adapter.backbone, prm.adapter.pad_id, seqs, [ids for ids, _ in rows], max_batch_tokens, read)
    return rewards
