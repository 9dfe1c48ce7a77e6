"""Step checker for toy solutions: labels every step of any solution text.

For each step (steps are separated by ``"\\n\\n"``):

* ``kind``: ``"first"`` (step 0, states the start value), ``"op"`` (an arithmetic step),
  ``"answer"`` (contains ``\\boxed{..}``) or ``"other"`` (anything after the answer, or unparseable
  text where an operation was expected is still kind ``"op"``).
* ``local_correct``: the step is right *given the previous step's stated value*: the first step
  states the problem's start value; operation step ``j`` writes ``a op b (columns) = c`` with
  ``op``/``b`` the problem's ``j``-th operation, ``a`` the value the previous step arrived at, the
  worked columns exactly those of ``a op b`` (:func:`~rsd_batch.toy.problems.worked_columns`) and ``c``
  the exact result; the answer step comes after the last operation and boxes the previous step's
  value. A step without its worked columns (``a op b = c``) is wrong, though its value still carries on.
* ``prefix_correct``: every step up to and including this one is locally correct (equivalently, the
  chain of stated values equals the true running values so far).

The whole solution also gets ``final_answer`` (last ``\\boxed{}``) and ``final_correct``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .problems import SYMBOL_OP, Problem, apply_op, worked_columns

EQ_RE = re.compile(r"(-?\d+)\s*([+\-*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$")
WORKED_RE = re.compile(r"(-?\d+) ([+\-*/]) (-?\d+) \(([^()]*)\) = (-?\d+)\s*\.?\s*$")
RESULT_RE = re.compile(r"=\s*(-?\d+)\s*\.?\s*$")
BOXED_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
INT_RE = re.compile(r"-?\d+")
END_MARKERS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class StepLabel:
    index: int
    text: str
    kind: str  # first | op | answer | other
    local_correct: bool
    prefix_correct: bool
    value: int | None  # the value this step arrives at (None if it states none)


@dataclass
class SolutionCheck:
    steps: list[StepLabel] = field(default_factory=list)
    final_answer: int | None = None
    final_correct: bool = False
    complete: bool = False  # ended with an answer step

    @property
    def num_correct_steps(self) -> int:
        return sum(s.local_correct for s in self.steps)


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """Split a solution into stripped, non-empty steps (end-of-text markers removed)."""
    for m in END_MARKERS:
        text = text.split(m)[0]
    return [s.strip() for s in text.split(delimiter) if s.strip()]


def _boxed(text: str) -> int | None:
    found = BOXED_RE.findall(text)
    return int(found[-1]) if found else None


def label_steps(problem: Problem, steps: list[str]) -> list[StepLabel]:
    """Label a list of step texts (see module doc)."""
    out: list[StepLabel] = []
    prev: int | None = None
    n_ops = len(problem.ops)
    answered = False
    all_ok = True
    for i, raw in enumerate(steps):
        text = raw.strip()
        boxed = _boxed(text)
        value: int | None = None
        if answered:
            kind, ok = "other", False
        elif boxed is not None:
            kind = "answer"
            value = boxed
            ok = i == n_ops + 1 and prev is not None and boxed == prev
            answered = True
        elif i == 0:
            kind = "first"
            nums = INT_RE.findall(text)
            value = int(nums[0]) if nums else None
            ok = value == problem.start and len(nums) == 1
        else:
            kind = "op"
            m = WORKED_RE.search(text)
            j = i - 1
            if m is None or j >= n_ops:
                ok = False
                r = RESULT_RE.search(text)
                if r is not None:
                    value = int(r.group(1))
            else:
                a, sym, b, cols, c = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), int(m.group(5))
                value = c
                op = problem.ops[j]
                ok = SYMBOL_OP.get(sym) == op.kind and b == op.operand and (prev is None or a == prev)
                if ok:
                    try:
                        ok = apply_op(op.kind, a, b) == c and a >= 0 and ",".join(worked_columns(op.kind, a, b)[0]) == cols
                    except ValueError:
                        ok = False
        all_ok = all_ok and ok
        out.append(StepLabel(index=i, text=text, kind=kind, local_correct=bool(ok), prefix_correct=bool(all_ok), value=value))
        prev = value
    return out


def check_solution(problem: Problem, solution_text: str) -> SolutionCheck:
    """Label every step of ``solution_text`` and grade its final answer against ``problem``."""
    steps = split_steps(solution_text)
    labels = label_steps(problem, steps)
    final = _boxed(solution_text.split("<|im_end|>")[0])
    return SolutionCheck(
        steps=labels,
        final_answer=final,
        final_correct=final is not None and final == problem.answer,
        complete=any(s.kind == "answer" for s in labels),
    )
