"""Synthetic step errors for PRM training: corrupt one step of a reference solution.

The corrupted step is labelled ``-``; steps before it ``+``; with some probability the solution
continues after it with steps that are *locally* correct from the wrong value (labelled ``+``),
so the PRM learns local correctness ("is this step right given the previous value?") rather than
"has anything gone wrong so far".
"""
from __future__ import annotations

import random

from .checker import label_steps
from .problems import Op, Problem, answer_step_text, apply_op, first_step_text, op_step_text


def perturb_number(rng: random.Random, n: int) -> int:
    """A plausible wrong value near ``n`` (digit slip, off by one/ten, swapped digits, ...)."""
    for _ in range(20):
        s = str(abs(n))
        kind = rng.random()
        if kind < 0.35:  # change one digit
            i = rng.randrange(len(s))
            d = rng.choice([c for c in "0123456789" if c != s[i]])
            m = int(s[:i] + d + s[i + 1:])
        elif kind < 0.55:
            m = n + rng.choice([-1, 1]) * rng.choice([1, 1, 2, 10, 10, 100, 1000])
        elif kind < 0.7 and len(s) > 1:  # swap adjacent digits
            i = rng.randrange(len(s) - 1)
            m = int(s[:i] + s[i + 1] + s[i] + s[i + 2:])
        elif kind < 0.8 and len(s) > 1:  # drop a digit
            i = rng.randrange(len(s))
            m = int(s[:i] + s[i + 1:])
        elif kind < 0.88:  # insert a digit
            i = rng.randrange(len(s) + 1)
            m = int(s[:i] + rng.choice("0123456789") + s[i:])
        else:
            m = n + rng.randint(-30, 30)
        if m != n and m >= 0:
            return m
    return n + 1


def _wrong_op_step(rng: random.Random, op: Op, a: int) -> tuple[str, int]:
    """An incorrect op step text and the value it arrives at."""
    c = op.apply(a)
    kind = rng.random()
    if kind < 0.55:  # wrong result
        c2 = perturb_number(rng, c)
        return op_step_text(op, a, c2), c2
    if kind < 0.75:  # wrong carried-in value, consistent arithmetic
        a2 = perturb_number(rng, a)
        try:
            c2 = op.apply(a2)
        except ValueError:
            c2 = perturb_number(rng, c)
            return op_step_text(op, a, c2), c2
        return op_step_text(op, a2, c2), c2
    if kind < 0.88:  # wrong operand
        b2 = perturb_number(rng, op.operand)
        try:
            c2 = apply_op(op.kind, a, b2)
        except ValueError:
            c2 = perturb_number(rng, c)
            return op_step_text(op, a, c2), c2
        return f"{op.sentence[:-1]}: {a} {op.symbol} {b2} = {c2}.", c2
    # wrong operator
    kinds = [k for k in ("add", "sub", "mul") if k != op.kind]
    k2 = rng.choice(kinds)
    try:
        c2 = apply_op(k2, a, op.operand)
    except ValueError:
        c2 = perturb_number(rng, c)
        return op_step_text(op, a, c2), c2
    sym = {"add": "+", "sub": "-", "mul": "*"}[k2]
    return f"{op.sentence[:-1]}: {a} {sym} {op.operand} = {c2}.", c2


def perturbed_solution(problem: Problem, rng: random.Random, p_continue: float = 0.5) -> tuple[list[str], list[bool]]:
    """Steps of a reference solution with one corrupted step, and their local-correctness labels."""
    n_ops = len(problem.ops)
    j = rng.randint(0, n_ops + 1)  # which step to corrupt
    steps: list[str] = []
    if j == 0:
        v = perturb_number(rng, problem.start)
        steps.append(first_step_text(problem.name, v, problem.item))
    else:
        steps.append(first_step_text(problem.name, problem.start, problem.item))
        v = problem.start
    cont = j == 0 or rng.random() < p_continue
    for i, op in enumerate(problem.ops, start=1):
        if i < j or (i > j and cont):
            try:
                c = op.apply(v)
            except ValueError:
                break
            if c < 0:
                break
            steps.append(op_step_text(op, v, c))
            v = c
        elif i == j:
            r = rng.random()
            if r < 0.1:  # answers too early
                steps.append(answer_step_text(v))
                break
            if r < 0.2 and i < n_ops:  # skips this operation and applies the next one
                nxt = problem.ops[i]
                try:
                    c = nxt.apply(v)
                except ValueError:
                    c = perturb_number(rng, v)
                steps.append(op_step_text(nxt, v, c))
                break
            text, v = _wrong_op_step(rng, op, v)
            steps.append(text)
        else:
            break
    else:
        if j == n_ops + 1:
            steps.append(answer_step_text(perturb_number(rng, v)))
        elif cont:
            steps.append(answer_step_text(v))
    labels = [s.local_correct for s in label_steps(problem, steps)]
    return steps, labels


def wrong_result_probe(problem: Problem, rng: random.Random) -> tuple[list[str], list[str]]:
    """Two step lists that differ only in one operation step's result: the reference prefix ending in
    the right step, and the same prefix ending in that step with a near-miss result (one digit
    changed, off by 1 or 10, ...). A PRM can only tell them apart by checking the arithmetic."""
    j = rng.randrange(len(problem.ops))
    steps = problem.reference_steps()[:j + 2]  # first step + operations up to j
    a, op = problem.values[j], problem.ops[j]
    wrong = op_step_text(op, a, perturb_number(rng, op.apply(a)))
    return steps, steps[:-1] + [wrong]
