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
from .kv import RowKV
from .sampling import SamplingParams


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
    ahead: Optional["Ahead"] = None  # a step a model began past its last one (generate_step's `ahead`)
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

    def ahead_of(self, role: str) -> Optional["Ahead"]:
        """The step `role` began ahead, if it did."""
        return self.ahead if self.ahead is not None and self.ahead.role == role else None

    def context(self, role: str) -> list[int]:
        """What `role` goes on from: the committed tokens, then the step it began ahead, if any."""
        a = self.ahead_of(role)
        return self.tokens + a.step.tokens if a else self.tokens

    def drop_ahead(self) -> None:
        """Forget the step begun ahead (its prefix was rejected, or the sample is done): its tokens
        count as discarded, and its model's generator goes back to where that step began, so the
        sample draws exactly what it would have drawn without it."""
        a, self.ahead = self.ahead, None
        if a is not None:
            self.ledger.role(a.role).discarded_tokens += len(a.step.tokens)
            if a.rng is not None:
                self.generators[a.role].set_state(a.rng)

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

    def rewind(self, role: str, length: int) -> None:
        """Make `role`'s cache forget everything past the first `length` tokens (proposals it rejected)."""
        self.cache(role).crop(length)

    def reject_candidate(self) -> None:
        """Take back the draft step just scored: the draft's cache returns to the committed prefix,
        the PRM's to before the candidate (the target rewrites that step); a step the draft began
        after the candidate is dropped."""
        self.drop_ahead()
        self.rewind("draft", len(self.tokens))
        self.rewind("prm", self.prm_committed)

    def queue_for_prm(self, text: str) -> None:
        """A committed step the PRM has not read (the target wrote it): read before the next candidate."""
        self.prm_pending.append(text)

    def finish(self, reason: str) -> None:
        self.drop_ahead()
        self.finish_reason = reason
        self.finished_at = time.perf_counter()

    def fork(self, generators: dict[str, torch.Generator]) -> "Seq":
        """A copy that shares this sequence's caches (they are never changed in place) and starts
        its own ledger: expanding a beam costs nothing until the child computes."""
        return Seq(key=self.key, problem=self.problem, tokens=list(self.tokens), prompt_len=self.prompt_len,
                   budget=self.budget, generators=generators,
                   kv={r: c.copy() for r, c in self.kv.items()},
                   last_writer=self.last_writer, steps=list(self.steps),
                   prm_pending=list(self.prm_pending), prm_committed=self.prm_committed,
                   started=self.started)


@dataclass
class StepOut:
    tokens: list[int]
    reason: str  # step (delimiter seen) | eos | budget
    probs: list = field(default_factory=list)  # with keep_probs: the distribution of each token


@dataclass
class Ahead:
    """A step `role` began past the one it was asked for (complete or not): the start of its next."""

    role: str
    step: StepOut
    rng: Optional[torch.Tensor]  # the role's generator state where the step began (to take it back)


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


# ---------------------------------------------------------------- the backend interface
# What a method asks of an engine. Each loaded model names its backend (`lm.backend`: engine/hf.py or
# engine/vllm.py); the methods' round logic is the same whichever engine serves it.


def generate_step(lm, seqs: list[Seq], params: SamplingParams, stopper, keep_probs: bool = False,
                  ahead: Optional[list[bool]] = None) -> list[StepOut]:
    """Each sequence's next step from model `lm` (role `lm.role`), in one batched decode: a row
    stops on its own at its step's end (`stopper`), EOS or its token budget. With `keep_probs` each
    sampled token's distribution is kept (speculative sampling).

    `ahead[i]`: row i, once its step has ended, may begin its next one while the other rows finish
    theirs (engine=hf; vllm ignores it). What it wrote is kept as `seq.ahead`, which the next call
    for `lm` goes on from; `Seq.drop_ahead` takes it back with its random draws. A sample's tokens
    therefore do not depend on it, only the number of forwards does."""
    return lm.backend.generate_step(lm, seqs, params, stopper, keep_probs, ahead) if seqs else []


def generate_steps(lm, seqs: list[Seq], params: SamplingParams, stopper, max_steps: list[int]
                   ) -> list[list[StepOut]]:
    """Each sequence's next steps from one model alone, at most `max_steps[i]` of them: a backend may
    return one step per call (hf: a round each) or the whole rest of the solution (vllm: one request
    each, split into steps afterwards), whichever it runs faster. Same tokens either way."""
    return lm.backend.generate_steps(lm, seqs, params, stopper, max_steps) if seqs else []


def split_into_steps(tokens: list[int], stopper, eos_ids, max_steps: int) -> tuple[list[StepOut], int]:
    """Cut a generated token run into the steps `generate_step` would have made, keeping at most
    `max_steps`; returns the steps and how many tokens were cut off after them."""
    steps, current = [], []
    for i, tok in enumerate(tokens):
        current.append(tok)
        reason = "eos" if tok in eos_ids else "step" if stopper.done(current) else ""
        if reason:
            steps.append(StepOut(current, reason))
            current = []
            if reason == "eos" or len(steps) >= max_steps:
                return steps, len(tokens) - i - 1
    if current:
        steps.append(StepOut(current, "budget"))
    return steps, 0


def score_tokens(lm, seqs: list[Seq], proposals: list[list[int]]) -> list[torch.Tensor]:
    """Logits of `lm` at each proposed token's position and one past it, [len(p) + 1, V] per row
    (speculative verification). The caller crops what it rejects."""
    return lm.backend.score_tokens(lm, seqs, proposals) if seqs else []


def score_steps(prm, seqs: list[Seq], candidates: list[str], max_batch_tokens: int) -> list[float]:
    """The PRM's reward for each sequence's candidate next step, reading only tokens it lacks.
    Afterwards the PRM has read the candidate too; `reject_candidate` takes it back."""
    return prm.backend.score_steps(prm, seqs, candidates, max_batch_tokens) if seqs else []


def prm_chunks(prm, seqs: list[Seq], candidates: list[str]) -> list[tuple[list[int], int]]:
    """Per row, the PRM tokens it has not read yet and where the candidate's reward is read among them.

    A row's chunk is: the problem (first time only), the committed steps the PRM has not read yet
    (written by the target after a rejection), then the candidate. Marks them read: afterwards
    `seq.prm_committed` is where the candidate starts, so a rejection can rewind to it.
    """
    rows = []
    for s, cand in zip(seqs, candidates):
        read = s.cache("prm").length
        ids = list(prm.adapter.prefix_ids(s.problem)) if read == 0 else []
        n_scored = len(s.steps) - len(s.prm_pending)
        for j, text in enumerate(s.prm_pending):
            ids += prm.adapter.step_ids(s.problem, text, n_scored + j)[0]
        step_ids, offset = prm.adapter.step_ids(s.problem, cand, len(s.steps))
        s.prm_committed = read + len(ids)
        rows.append((ids + step_ids, len(ids) + offset))
        s.prm_pending = []
    return rows


def length_groups(lengths: list[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Indices sorted by length, cut into groups whose padded size stays under the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= max_batch_tokens:
            end += 1
        yield order[start:end]
        start = end


def reject_candidate(seq: Seq) -> None:
    """Drop the last scored candidate (see `Seq.reject_candidate`)."""
    seq.reject_candidate()


def run_rounds(keys: Iterable[Any], batch_size: int, refill: bool, start: Callable[[Any], Seq],
               round_fn: Callable[[list[Seq]], None], parked: Callable[[], int] = lambda: 0) -> Iterator[Seq]:
    """Keep up to `batch_size` sequences in flight, one round at a time; yield each as it finishes.

    With `refill`, a finished sequence's place goes to the next key at once (continuous batching);
    without, a new batch starts only when the whole previous one is done. `parked()` sequences (RSD's,
    waiting for the target) hold no place: the others fill the batch while they wait.
    """
    pending = iter(keys)
    active: list[Seq] = []
    exhausted = False
    while True:
        if not exhausted and (refill or not active):
            while len(active) - parked() < batch_size:
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
