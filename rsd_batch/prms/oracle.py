"""The toy world's oracle PRM (`prm=oracle`): each step scored by the toy checker, 1.0 when it is right
given the steps before it, else 0.0. An upper bound, never a default: it shows how much of RSD's gap
is the PRM's and how much the draft's, and it costs nothing (no model runs; its ledger stays at zero).

`prm.path` is the toy problem set the run decodes (JSON lines or Arrow written by
rsd_batch/toy/problems.py): the checker needs each problem's operations, which the file holds.
"""
from __future__ import annotations

from pathlib import Path

from ..toy.checker import label_steps
from ..toy.problems import read_problem_set


class OraclePRM:
    def __init__(self, problems):
        self.problems = {p.text: p for p in problems}

    @classmethod
    def from_pretrained(cls, path: str, **_) -> "OraclePRM":
        if not Path(path).is_file():
            raise ValueError(f"prm=oracle reads the toy problem set the run decodes; {path} is not a file "
                             "(prm.path, default: dataset.source)")
        return cls(read_problem_set(path))

    def reward(self, problem: str, steps: list[str]) -> float:
        known = self.problems.get(problem)
        if known is None:
            raise ValueError(f"prm=oracle: a problem that is not in its problem set: {problem[:80]!r}")
        return 1.0 if label_steps(known, [s.strip() for s in steps])[-1].local_correct else 0.0

    def score(self, problems, steps) -> list[list[float]]:
        return [[self.reward(p, list(s[: i + 1])) for i in range(len(s))] for p, s in zip(problems, steps)]


def score_steps(prm, seqs, candidates: list[str], max_batch_tokens: int) -> list[float]:
    """The checker's verdict on each candidate after the sequence's committed steps (this module is
    the oracle's engine: `LoadedPRM.backend`)."""
    return [prm.adapter.reward(s.problem, [st.text for st in s.steps] + [c]) for s, c in zip(seqs, candidates)]
