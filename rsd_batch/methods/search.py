"""PRM-guided search baselines, as in Hugging Face's search-and-learn.

best_of_n     N full solutions from the policy, each step scored by the PRM as it is written; the
              solution whose aggregated score (last / min / prod / mean) is highest is the answer.
beam_search   step-level beam search: N candidates per step, the PRM scores their last step, the
              best N/M (beam_width M) are kept and each is expanded M ways for the next step;
              finished beams are set aside until N of them exist or max_steps is reached.
Every candidate ever decoded is paid for: the sample's ledger is the sum over all of them.
"""
from __future__ import annotations

import math
from collections import defaultdict

from ..config import Aggregation
from ..engine import SamplingParams, stopper_for, generate_step, run_rounds, score_steps
from ..ledger import Ledger
from . import Context, Method, Step, generators, start_seq, to_result


def aggregate(rewards: list[float], how: Aggregation) -> float:
    if not rewards:
        return -math.inf
    if how == Aggregation.last:
        return rewards[-1]
    if how == Aggregation.min:
        return min(rewards)
    if how == Aggregation.prod:
        return math.prod(rewards)
    return sum(rewards) / len(rewards)


def _score(seq, how: Aggregation) -> float:
    return aggregate([s.reward for s in seq.steps if s.reward is not None], how)


def _pick(candidates, spent, how, policy):
    """The best candidate's text (ties: the first), with the cost of every sequence decoded."""
    best = max(candidates, key=lambda s: _score(s, how))
    total = Ledger()
    for s in spent:
        total.add(s.ledger)
    best.ledger = total
    best.finished_at = max((s.finished_at or s.started) for s in spent)
    return to_result(best, policy)


def _policy_round(policy, prm, cfg, params, stopper):
    def round_fn(active):
        outs = generate_step(policy, active, params, stopper)
        texts = [policy.decode(o.tokens) for o in outs]
        rewards = score_steps(prm, active, texts, cfg.prm_batch_tokens)
        for seq, out, text, reward in zip(active, outs, texts, rewards):
            seq.commit(out.tokens, Step(text, policy.role, reward), out.reason, cfg.max_steps)
    return round_fn


def best_of_n(tasks, ctx: Context):
    cfg = ctx.method
    policy, prm = ctx.models[cfg.policy.value], ctx.models["prm"]
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
    round_fn = _policy_round(policy, prm, cfg, params, stopper_for(policy.tokenizer, cfg))
    keys = ((task, j) for task in tasks for j in range(cfg.candidates))
    done: dict = defaultdict(list)

    def start(key):
        seq = start_seq(key[0], ctx, [policy], tag=f"#{key[1]}")
        seq.key = key
        return seq

    for seq in run_rounds(keys, ctx.batch_size, cfg.refill, start, round_fn):
        task = seq.key[0]
        done[task].append(seq)
        if len(done[task]) == cfg.candidates:
            seqs = done.pop(task)
            for s in seqs:
                s.key = task
            yield _pick(seqs, seqs, cfg.aggregation, policy)


def beam_search(tasks, ctx: Context):
    cfg = ctx.method
    policy, prm = ctx.models[cfg.policy.value], ctx.models["prm"]
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
    round_fn = _policy_round(policy, prm, cfg, params, stopper_for(policy.tokenizer, cfg))
    n, width = cfg.candidates, cfg.beam_width
    keep = max(1, n // width)
    per_batch = max(1, ctx.batch_size // n)  # problems searched together
    pending = iter(tasks)
    while True:
        group = [t for _, t in zip(range(per_batch), pending)]
        if not group:
            return
        live = {t: [start_seq(t, ctx, [policy], tag=f"#{j}") for j in range(n)] for t in group}
        finished: dict = {t: [] for t in group}
        spent: dict = {t: list(live[t]) for t in group}  # every sequence ever decoded
        for t in group:
            if live[t][0].finish_reason:  # the prompt does not fit: nothing to search
                finished[t], live[t] = live[t][:1], []
        for depth in range(cfg.max_steps):
            active = [s for t in group for s in live[t]]
            if not active:
                break
            round_fn(active)
            for t in group:
                done_now = [s for s in live[t] if s.finish_reason]
                finished[t] += done_now
                going = sorted((s for s in live[t] if not s.finish_reason),
                               key=lambda s: _score(s, Aggregation.last), reverse=True)[:keep]
                if len(finished[t]) >= n or not going:
                    live[t] = []
                    continue
                children = [beam.fork(generators(ctx.seed, t, f"@{depth}.{b}.{m}"))
                            for b, beam in enumerate(going) for m in range(width)]
                spent[t] += children
                live[t] = children
        for t in group:
            for s in live[t]:  # out of steps: the search ends here
                s.finish("max_steps")
            yield _pick(finished[t] or live[t], spent[t], cfg.aggregation, policy)


def _needs(cfg) -> tuple[str, ...]:
    return (cfg.policy.value, "prm")


METHODS = [Method("best_of_n", _needs, best_of_n), Method("beam_search", _needs, beam_search)]
