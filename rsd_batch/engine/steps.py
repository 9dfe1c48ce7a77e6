"""Step-level batched decoding: sequences in flight, one step per round, continuous batching.

A `Seq` is one sample being decoded: its tokens so far (prompt + committed steps), a cache and a
random generator per model, and its ledger. `generate_step` makes every given sequence produce its
next step with one model in one batched decode (stopping each row on its own at the step
delimiter, EOS or its token budget). `score_steps` scores candidate steps with the PRM in batched
forwards over only the new tokens. `run_rounds` keeps a batch full: finished sequences leave,
new ones join between rounds. Methods (rsd_batch/methods/) decide what a round does.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from ..ledger import Ledger
from .kv import KVBatch, RowKV
from .sampling import SamplingParams, distribution, draw, sample_next


@dataclass
class Seq:
    """One sample in flight."""

    key: Any  # what the caller uses to know the sample (a methods.Task)
    problem: str
    tokens: list[int]  # prompt + committed step tokens
    prompt_len: int
    budget: int  # max new tokens for the whole sample
    generators: dict[str, torch.Generator]
    ledger: Ledger = field(default_factory=Ledger)
    kv: dict[str, RowKV] = field(default_factory=dict)
    last_writer: Optional[str] = None  # the role whose token ends `tokens`
    steps: list = field(default_factory=list)  # committed methods.Step records
    prm_pending: list[str] = field(default_factory=list)  # committed steps the PRM has not read
    prm_committed: int = 0  # PRM cache length before the step it scored last
    finish_reason: Optional[str] = None
    started: float = field(default_factory=time.perf_counter)
    finished_at: float = 0.0
    error: Optional[str] = None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def left(self) -> int:
        return self.budget - self.generated

    def cache(self, role: str) -> RowKV:
        return self.kv.setdefault(role, RowKV())

    def extend(self, tokens: list[int], writer: str, eos: bool) -> None:
        """Append tokens written by `writer`; finish at EOS or when the token budget is spent."""
        self.tokens.extend(tokens)
        self.last_writer = writer
        if eos:
            self.finish("eos")
        elif self.left <= 0:
            self.finish("max_tokens")

    def commit(self, tokens: list[int], step, reason: str, max_steps: int) -> None:
        """Append a step; decide whether the sample is finished (eos, max_tokens, max_steps)."""
        self.steps.append(step)
        self.extend(tokens, step.source, reason == "eos")
        if not self.finish_reason and len(self.steps) >= max_steps:
            self.finish("max_steps")

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def fork(self, generators: dict[str, torch.Generator]) -> "Seq":
        """A copy that shares this sequence's caches (they are never changed in place) and starts
        its own ledger: expanding a beam costs nothing until the child computes."""
        return Seq(key=self.key, problem=self.problem, tokens=list(self.tokens), prompt_len=self.prompt_len,
                   budget=self.budget, generators=generators,
                   kv={r: RowKV(list(c.layers), c.length) for r, c in self.kv.items()},
                   last_writer=self.last_writer, steps=list(self.steps),
                   prm_pending=list(self.prm_pending), prm_committed=self.prm_committed,
                   started=self.started)


@dataclass
class StepOut:
    tokens: list[int]
    reason: str  # step (delimiter seen) | eos | budget
    probs: list = field(default_factory=list)  # with keep_probs: the distribution of each token


def stopper_for(tokenizer, cfg):
    """How a method's steps end: at the delimiter, or after `method.step_tokens` tokens."""
    return FixedLength(cfg.step_tokens) if cfg.step_tokens > 0 else StepStopper(tokenizer, cfg.step_delimiter)


class FixedLength:
    """A 'step' of k tokens (speculative sampling's proposals)."""

    def __init__(self, k: int):
        self.k = k

    def done(self, step_tokens: list[int]) -> bool:
        return len(step_tokens) >= self.k


class StepStopper:
    """Knows when a step is complete: its decoded text contains the delimiter.

    Checked by text, not by a token id, because BPE vocabularies merge the delimiter with its
    neighbours (".\\n\\n" is one Qwen token) or split it ("\\n" + "\\n"). Only tokens whose text has a
    delimiter character trigger a decode of the step, so the check is cheap.
    """

    def __init__(self, tokenizer, delimiter: str):
        self.tokenizer, self.delimiter = tokenizer, delimiter
        self.candidates = _tokens_with_any(tokenizer, frozenset(delimiter))

    def done(self, step_tokens: list[int]) -> bool:
        if step_tokens[-1] not in self.candidates:
            return False
        return self.delimiter in self.tokenizer.decode(step_tokens, skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def _tokens_with_any(tokenizer, chars: frozenset) -> frozenset:
    """Ids whose text holds one of `chars` (once per tokenizer: decoding a vocabulary takes a moment)."""
    ids = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    return frozenset(i for i, t in zip(ids, texts) if any(c in t for c in chars))


def _feed_chunks(lm, seqs: list[Seq], extra: Optional[list[list[int]]] = None, logits_to_keep: int = 1):
    """Batch the rows and run each one's uncached tokens (plus `extra` ones) through `lm`.

    Charges each row's ledger: tokens the model wrote itself and never fed count as decode,
    everything else as prefill; the forward's time is split by tokens.
    """
    role = lm.role
    caches = [s.cache(role) for s in seqs]
    chunks = [s.tokens[c.length:] + (extra[i] if extra else []) for i, (s, c) in enumerate(zip(seqs, caches))]
    batch = KVBatch(lm.model, lm.device, lm.pad_id, caches, chunks)
    t0 = time.perf_counter()
    out = batch.forward_chunk(logits_to_keep=logits_to_keep)
    lm.synchronize()
    elapsed = time.perf_counter() - t0
    total = sum(len(c) for c in chunks)
    for s, c, chunk in zip(seqs, caches, chunks):
        cost = s.ledger.role(role)
        own = 1 if s.last_writer == role and not extra else 0  # its own last token, as a decode would
        cost.add_prefill(lm.cost, len(chunk) - own, c.length)
        if own:
            cost.add_decode(lm.cost, c.length + len(chunk) - 1)
        cost.seconds += elapsed * len(chunk) / total
    return batch, out, caches, chunks


@torch.inference_mode()
def generate_step(lm, seqs: list[Seq], params: SamplingParams, stopper, keep_probs: bool = False
                  ) -> list[StepOut]:
    """Each sequence's next step from model `lm` (role `lm.role`), in one batched decode.

    Every row first feeds the tokens its cache lacks (its chunk); rows then sample until their own
    step ends (`stopper.done(step_tokens)`), EOS or their budget, and leave the batch with their
    cache. With `keep_probs` each sampled token's distribution is kept (speculative sampling).
    """
    role = lm.role
    if not seqs:
        return []
    batch, out, caches, chunks = _feed_chunks(lm, seqs)
    outs = [StepOut([], "") for _ in seqs]
    logits = out.logits[:, -1]
    while True:
        live = batch.rows
        if keep_probs:
            probs = distribution(logits, params)
            tokens = [draw(probs[b], seqs[i].generators[role]) if not params.greedy else int(probs[b].argmax())
                      for b, i in enumerate(live)]
        else:
            tokens = sample_next(logits, params, [seqs[i].generators[role] for i in live])
        keep = []
        for b, (i, tok) in enumerate(zip(live, tokens)):
            s, o = seqs[i], outs[i]
            o.tokens.append(tok)
            if keep_probs:
                o.probs.append(probs[b])
            s.ledger.role(role).generated_tokens += 1
            if tok in lm.eos_ids:
                o.reason = "eos"
            elif stopper.done(o.tokens):
                o.reason = "step"
            elif len(o.tokens) >= s.left:
                o.reason = "budget"
            if o.reason:
                s.kv[role] = batch.extract(b)
            else:
                keep.append(b)
        if not keep:
            return outs
        batch.keep(keep)
        fed = [tokens[b] for b in keep]
        t0 = time.perf_counter()
        out = batch.forward_next(fed)
        lm.synchronize()
        share = (time.perf_counter() - t0) / len(keep)
        logits = out.logits[:, -1]
        for i in batch.rows:
            s = seqs[i]
            cost = s.ledger.role(role)
            # The token just fed attends to the cache it found plus itself.
            cost.add_decode(lm.cost, caches[i].length + len(chunks[i]) + len(outs[i].tokens) - 1)
            cost.seconds += share


@torch.inference_mode()
def score_tokens(lm, seqs: list[Seq], proposals: list[list[int]]) -> list[torch.Tensor]:
    """Logits of `lm` at each proposed token's position and one past it, [len(p) + 1, V] per row.

    One forward: each row feeds what its cache lacks plus its proposal (speculative verification).
    Afterwards the row's cache covers the proposal; the caller crops what it rejects.
    """
    if not seqs:
        return []
    n = max(len(p) for p in proposals) + 1
    batch, out, _, _ = _feed_chunks(lm, seqs, extra=proposals, logits_to_keep=n)
    logits = out.logits.float()
    result = []
    for b, (s, p) in enumerate(zip(seqs, proposals)):
        s.kv[lm.role] = batch.extract(b)
        result.append(logits[b, n - len(p) - 1:].cpu())
    return result


@torch.inference_mode()
def score_steps(prm, seqs: list[Seq], candidates: list[str], max_batch_tokens: int) -> list[float]:
    """The PRM's reward for each sequence's candidate next step, reading only tokens it lacks.

    A row's chunk is: the problem (first time only), the committed steps the PRM has not read yet
    (written by the target after a rejection), then the candidate. Rows are grouped by chunk length
    under a token budget per forward. Afterwards each row's PRM cache holds the candidate too;
    `reject_candidate` drops it again.
    """
    rows = []
    for s, cand in zip(seqs, candidates):
        c = s.cache("prm")
        ids = list(prm.prefix_ids(s.problem)) if c.length == 0 else []
        n_scored = len(s.steps) - len(s.prm_pending)
        for j, text in enumerate(s.prm_pending):
            ids += prm.step_ids(s.problem, text, n_scored + j)[0]
        step_ids, offset = prm.step_ids(s.problem, cand, len(s.steps))
        s.prm_committed = c.length + len(ids)
        rows.append((ids + step_ids, len(ids) + offset))
        s.prm_pending = []
    rewards = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(rows[i][0]))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(rows[order[end]][0]) <= max_batch_tokens:
            end += 1
        group = order[start:end]
        chunks = [rows[i][0] for i in group]
        batch = KVBatch(prm.backbone, prm.device, prm.pad_id, [seqs[i].cache("prm") for i in group], chunks)
        t0 = time.perf_counter()
        hidden = batch.forward_chunk().last_hidden_state
        picked = torch.stack([hidden[b, batch.width - len(chunks[b]) + rows[i][1]]
                              for b, i in enumerate(group)])
        scores = prm.rewards_from_hidden(picked).float().cpu().tolist()  # .cpu() waits for the GPU
        elapsed = time.perf_counter() - t0
        total = sum(len(c) for c in chunks)
        for b, i in enumerate(group):
            s = seqs[i]
            before = s.cache("prm").length
            s.kv["prm"] = batch.extract(b)
            s.ledger.prm.add_prefill(prm.cost, len(chunks[b]), before)
            s.ledger.prm.seconds += elapsed * len(chunks[b]) / total
            rewards[i] = scores[b]
        start = end
    return rewards


def reject_candidate(seq: Seq) -> None:
    """Drop the last scored candidate from the PRM's cache (the target rewrites that step)."""
    seq.cache("prm").crop(seq.prm_committed)


def run_rounds(keys: Iterable[Any], batch_size: int, refill: bool, start: Callable[[Any], Seq],
               round_fn: Callable[[list[Seq]], None]) -> Iterator[Seq]:
    """Keep up to `batch_size` sequences in flight, one round at a time; yield each as it finishes.

    With `refill`, a finished sequence's place goes to the next key at once (continuous batching);
    without, a new batch starts only when the whole previous one is done.
    """
    pending = iter(keys)
    active: list[Seq] = []
    exhausted = False
    while True:
        if not exhausted and (refill or not active):
            while len(active) < batch_size:
                key = next(pending, None)
                if key is None:
                    exhausted = True
                    break
                seq = start(key)
                if seq.finish_reason:  # could not start (an error): done already
                    yield seq
                else:
                    active.append(seq)
        if not active:
            return
        round_fn(active)
        still = []
        for seq in active:
            if seq.finish_reason:
                seq.kv.clear()  # free its caches now
                yield seq
            else:
                still.append(seq)
        active = still
