"""Measuring the toy world: policy accuracy, PRM AUROC and operating points.

Policy: greedy final-answer accuracy and per-step accuracy (share of the model's own greedy steps
that the checker marks locally correct). PRM: steps sampled from the draft at temperature 0.7 on
held-out problems, scored by the PRM, compared with the checker's labels; AUROC overall and by step
kind (first / op / answer), and at each threshold delta the share of draft steps accepted
(reward >= delta), precision (correct among accepted) and recall (accepted among correct).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence

import numpy as np

from .checker import check_solution, split_steps
from .lm import generate_solutions
from .perturb import wrong_result_probe
from .problems import Problem


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Rank-based AUROC (Mann-Whitney U with average ranks for ties); nan if one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def evaluate_policy(model, tokenizer, problems: Sequence[Problem], batch_size: int = 128,
                    max_new_tokens: int = 384) -> dict:
    """Greedy final-answer accuracy and per-step accuracy of ``model`` on ``problems``."""
    texts = [t[0] for t in generate_solutions(model, tokenizer, problems, temperature=0.0,
                                              batch_size=batch_size, max_new_tokens=max_new_tokens)]
    n_ok = 0
    steps_total = steps_ok = 0
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, t in zip(problems, texts):
        chk = check_solution(p, t)
        n_ok += chk.final_correct
        for s in chk.steps:
            steps_total += 1
            steps_ok += s.local_correct
            by_kind[s.kind][0] += s.local_correct
            by_kind[s.kind][1] += 1
            if s.kind == "op" and 0 < s.index <= len(p.ops):
                key = "op_" + p.ops[s.index - 1].kind
                by_kind[key][0] += s.local_correct
                by_kind[key][1] += 1
    return {
        "n_problems": len(problems),
        "accuracy": n_ok / max(1, len(problems)),
        "step_accuracy": steps_ok / max(1, steps_total),
        "step_accuracy_by_kind": {k: v[0] / v[1] for k, v in sorted(by_kind.items())},
        "n_steps": steps_total,
    }


def sample_labelled_steps(model, tokenizer, problems: Sequence[Problem], temperature: float = 0.7,
                          seed: int = 0, num_samples: int = 1, batch_size: int = 128,
                          max_new_tokens: int = 384) -> list[dict]:
    """Draft rollouts at ``temperature``, split into steps and labelled by the checker.

    One record per step: problem index, step index, the steps so far, kind, local/prefix labels,
    and ``context_ok`` (all previous steps correct, i.e. the situation RSD puts the PRM in).
    """
    rollouts = generate_solutions(model, tokenizer, problems, temperature=temperature, seed=seed,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, num_samples=num_samples)
    records = []
    for pi, (p, texts) in enumerate(zip(problems, rollouts)):
        for k, t in enumerate(texts):
            labels = check_solution(p, t).steps
            steps = [s.text for s in labels]
            for s in labels:
                records.append({
                    "problem": pi, "sample": k, "step": s.index, "steps": steps, "kind": s.kind,
                    "local_correct": s.local_correct, "prefix_correct": s.prefix_correct,
                    "context_ok": s.index == 0 or labels[s.index - 1].prefix_correct,
                })
    return records


def score_records(prm, problems: Sequence[Problem], records: list[dict], batch_size: int = 64) -> list[float]:
    """PRM reward of every labelled step record (one forward per rollout)."""
    keys = sorted({(r["problem"], r["sample"]) for r in records})
    first = {}
    for r in records:
        first.setdefault((r["problem"], r["sample"]), r["steps"])
    rewards: dict[tuple, list[float]] = {}
    for s in range(0, len(keys), batch_size):
        chunk = keys[s:s + batch_size]
        out = prm.score([problems[k[0]].text for k in chunk], [first[k] for k in chunk])
        for k, r in zip(chunk, out):
            rewards[k] = r
    return [rewards[(r["problem"], r["sample"])][r["step"]] for r in records]


def prm_metrics(records: list[dict], rewards: Sequence[float], deltas=(0.3, 0.5, 0.7, 0.9)) -> dict:
    """AUROC (overall, by kind, against local and prefix labels) and operating points per delta."""
    r = np.asarray(rewards, dtype=np.float64)
    local = np.array([x["local_correct"] for x in records], dtype=bool)
    prefix = np.array([x["prefix_correct"] for x in records], dtype=bool)
    ctx = np.array([x["context_ok"] for x in records], dtype=bool)
    kinds = np.array([x["kind"] for x in records])
    out: dict = {
        "n_steps": int(len(r)),
        "share_correct": float(local.mean()) if len(r) else float("nan"),
        "auroc": auroc(r, local),
        "auroc_prefix_label": auroc(r, prefix),
        "auroc_correct_context": auroc(r[ctx], local[ctx]),
        "auroc_by_kind": {},
        "n_by_kind": {},
        "operating_points": [],
    }
    for k in ("first", "op", "answer", "other"):
        m = kinds == k
        if m.any():
            out["auroc_by_kind"][k] = auroc(r[m], local[m])
            out["n_by_kind"][k] = {"steps": int(m.sum()), "incorrect": int((~local[m]).sum())}
    for d in deltas:
        acc = r >= d
        out["operating_points"].append({
            "delta": d,
            "accept_share": float(acc.mean()),
            "precision": float(local[acc].mean()) if acc.any() else float("nan"),
            "recall": float(acc[local].mean()) if local.any() else float("nan"),
            "precision_correct_context": float(local[acc & ctx].mean()) if (acc & ctx).any() else float("nan"),
            "recall_correct_context": float(acc[local & ctx].mean()) if (local & ctx).any() else float("nan"),
        })
    return out


def arithmetic_probe_auroc(prm, problems: Sequence[Problem], seed: int = 0) -> float:
    """AUROC of the PRM on one operation step per problem, right vs. a near-miss wrong result, after a
    correct prefix (``perturb.wrong_result_probe``): whether it checks the arithmetic itself rather
    than the look of the draft's mistakes."""
    rng = random.Random(seed)
    pairs = [wrong_result_probe(p, rng) for p in problems]
    texts = [p.text for p in problems]
    right = prm.score(texts, [r for r, _ in pairs])
    wrong = prm.score(texts, [w for _, w in pairs])
    return auroc([r[-1] for r in right] + [w[-1] for w in wrong], [True] * len(right) + [False] * len(wrong))


def evaluate_prm(prm, draft, tokenizer, problems: Sequence[Problem], temperature: float = 0.7, seed: int = 0,
                 num_samples: int = 1, deltas=(0.3, 0.5, 0.7, 0.9)) -> dict:
    records = sample_labelled_steps(draft, tokenizer, problems, temperature=temperature, seed=seed,
                                    num_samples=num_samples)
    rewards = score_records(prm, problems, records)
    res = prm_metrics(records, rewards, deltas)
    res.update({"temperature": temperature, "num_problems": len(problems), "num_samples": num_samples,
                "auroc_arithmetic_probe": arithmetic_probe_auroc(prm, problems, seed=seed)})
    return res


__all__ = ["auroc", "evaluate_policy", "sample_labelled_steps", "score_records", "prm_metrics", "evaluate_prm",
           "arithmetic_probe_auroc", "split_steps"]
