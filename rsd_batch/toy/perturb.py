"""Synthetic step errors for PRM training: corrupt one step of a reference solution.

The corrupted step is labelled ``-``; steps before it ``+``; with some probability the solution
continues after it with steps that are *locally* correct from the wrong value (labelled ``+``),
so the PRM learns local correctness ("is this step right given the previous value?") rather than
"has anything gone wrong so far".
"""
from __future__ import annotations

import random
import re

from .checker import label_steps
from .problems import MUL_WORDS, OP_SYMBOL, Op, Problem, answer_step_text, apply_op, first_step_text, op_step_text, worked_columns


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


def _fault(rng: random.Random, kind: str, a: int, b: int) -> tuple[int, int] | None:
    """A one-column slip in ``a kind b``: (column, near-miss value); None if there are no columns."""
    cols, _ = worked_columns(kind, a, b)
    if not cols:
        return None
    i = rng.randrange(len(cols))
    s = int(cols[i].split("=")[1])
    hi = 9 if kind == "sub" else 29
    cands = [v for v in (s - 1, s + 1, s - 1, s + 1, s - 10, s + 10, rng.randint(0, hi)) if 0 <= v <= hi and v != s]
    return (i, rng.choice(cands)) if cands else None


def _sym_step(op: Op, a: int, kind: str, b: int, fault=None, c: int | None = None) -> tuple[str, int]:
    cols, spelled = worked_columns(kind, a, b, fault)
    c = spelled if c is None else c
    return f"{op.sentence[:-1]}: {a} {OP_SYMBOL[kind]} {b} ({','.join(cols)}) = {c}.", c


# The kinds of operation-step slips and their default shares (policies' slips; ``sentence`` is the
# draft's commonest: restating another operation, or its own with another operation's operand).
SLIPS = {"column": 0.25, "result": 0.30, "carried": 0.06, "column_read": 0.05, "operand": 0.07, "operator": 0.07,
         "sentence": 0.20}


def _restate(op: Op, b: int) -> str:
    """``op``'s sentence with operand ``b`` instead of its own (mul: the doubles/triples word follows)."""
    pronoun = op.sentence.split(" ", 1)[0]
    if op.kind == "mul":
        return (f"{pronoun} {MUL_WORDS[b]} them." if b in MUL_WORDS and not op.sentence.endswith(f" {op.operand}.")
                else f"{pronoun} multiplies them by {b}.")
    return re.sub(rf"\b{op.operand}\b", str(b), op.sentence, count=1)


def _sentence_slip(rng: random.Random, op: Op, a: int, others: list[Op]) -> tuple[str, int] | None:
    """The step restates the wrong sentence, with arithmetic consistent with it: another operation's
    (skipped to or repeated), its own with another operand, or another's with its own operand."""
    other = [o for o in others if o is not op]
    r = rng.random()
    if other and r < 0.35:
        o = rng.choice(other)
        kind, b, sentence = o.kind, o.operand, o.sentence
    elif other and r < 0.55 and op.kind != "mul":
        o = rng.choice([o for o in other if o.kind != "mul"] or other)
        kind = o.kind
        b = op.operand if kind != "mul" else o.operand
        sentence = _restate(o, b)
    else:
        if op.kind == "mul":
            b = 5 - op.operand if op.operand in (2, 3) else rng.choice([2, 3])
        else:
            cands = [o.operand for o in other if o.kind != "mul" and o.operand != op.operand]
            b = rng.choice(cands) if cands and rng.random() < 0.7 else perturb_number(rng, op.operand)
        kind, sentence = op.kind, _restate(op, b)
    try:
        c = apply_op(kind, a, b)
    except ValueError:
        return None
    if c < 0:
        return None
    cols, c = worked_columns(kind, a, b)
    return f"{sentence[:-1]}: {a} {OP_SYMBOL[kind]} {b} ({','.join(cols)}) = {c}.", c


def _wrong_op_step(rng: random.Random, op: Op, a: int, others: list[Op] = (),
                   slips: dict[str, float] | None = None) -> tuple[str, int]:
    """An incorrect op step text and the value it arrives at (the slips a policy makes: one wrong column
    carried on consistently, a miscopied result, carried-in value, operand or digit, a wrong operator or
    sentence), the kind drawn with the weights ``slips`` (default :data:`SLIPS`); ``others`` are the
    problem's operations (for ``sentence``)."""
    c = op.apply(a)
    slips = slips or SLIPS
    kind = rng.choices(list(slips), weights=list(slips.values()))[0]
    if kind == "sentence":
        out = _sentence_slip(rng, op, a, list(others))
        if out is not None and out[1] >= 0:
            return out
        kind = "result"
    if kind == "column" and rng.random() < 0.2:  # the last column left out, the result one digit short
        cols, _ = worked_columns(op.kind, a, op.operand)
        if len(cols) > 1 and len(str(c)) > 1:
            c2 = int(str(c)[1:])
            return f"{op.sentence[:-1]}: {a} {op.symbol} {op.operand} ({','.join(cols[:-1])}) = {c2}.", c2
    if kind == "column":  # one column wrong, the rest consistent with it
        f = _fault(rng, op.kind, a, op.operand)
        if f is not None:
            text, c2 = _sym_step(op, a, op.kind, op.operand, fault=f)
            if c2 >= 0:
                return text, c2
        kind = "result"
    if kind == "result":  # right columns, miscopied result (the draft's commonest slip: one digit, often the last)
        s = str(c)
        i = len(s) - 1 if rng.random() < 0.5 else rng.randrange(len(s))
        d = int(s[i])
        d2 = rng.choice([x for x in {(d + 1) % 10, (d - 1) % 10, rng.randrange(10)} if x != d])
        c2 = int(s[:i] + str(d2) + s[i + 1:]) if rng.random() < 0.8 else perturb_number(rng, c)
        if c2 == c or (c2 > 0 and s[0] != "0" and str(c2)[0] == "0"):
            c2 = perturb_number(rng, c)
        return _sym_step(op, a, op.kind, op.operand, c=c2)
    if kind == "carried":  # wrong carried-in value, consistent arithmetic
        a2 = perturb_number(rng, a)
        try:
            if op.apply(a2) >= 0:
                return _sym_step(op, a2, op.kind, op.operand)
        except ValueError:
            pass
        return _sym_step(op, a, op.kind, op.operand, c=perturb_number(rng, c))
    if kind == "column_read":  # the columns read a miscopied digit of a, the header the right a
        a2 = perturb_number(rng, a)
        try:
            if op.apply(a2) >= 0 and len(str(a2)) == len(str(a)):
                cols, c2 = worked_columns(op.kind, a2, op.operand)
                return f"{op.sentence[:-1]}: {a} {op.symbol} {op.operand} ({','.join(cols)}) = {c2}.", c2
        except ValueError:
            pass
        return _sym_step(op, a, op.kind, op.operand, c=perturb_number(rng, c))
    if kind == "operand":  # wrong operand in the arithmetic, the sentence right
        b2 = perturb_number(rng, op.operand)
        try:
            if apply_op(op.kind, a, b2) >= 0:
                return _sym_step(op, a, op.kind, b2)
        except ValueError:
            pass
        return _sym_step(op, a, op.kind, op.operand, c=perturb_number(rng, c))
    # wrong operator
    k2 = rng.choice([k for k in ("add", "sub", "mul") if k != op.kind])
    b = op.operand if k2 != "mul" else rng.choice([2, 3])
    try:
        if apply_op(k2, a, b) >= 0:
            return _sym_step(op, a, k2, b)
    except ValueError:
        pass
    return _sym_step(op, a, op.kind, op.operand, c=perturb_number(rng, c))


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
            text, v = _wrong_op_step(rng, op, v, problem.ops)
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
    """Two step lists that differ only in one operation step's arithmetic: the reference prefix ending in
    the right step, and the same prefix ending in that step with a near-miss result, reached by one
    slipped column carried on consistently (``a op b`` unchanged). A PRM can only tell them apart by
    checking the arithmetic."""
    j = rng.randrange(len(problem.ops))
    steps = problem.reference_steps()[:j + 2]  # first step + operations up to j
    a, op = problem.values[j], problem.ops[j]
    for _ in range(50):
        f = _fault(rng, op.kind, a, op.operand)
        wrong, c2 = _sym_step(op, a, op.kind, op.operand, fault=f)
        if c2 != op.apply(a):
            break
    else:
        wrong, _ = _sym_step(op, a, op.kind, op.operand, c=perturb_number(rng, op.apply(a)))
    return steps, steps[:-1] + [wrong]


def multi_perturbed_solution(problem: Problem, rng: random.Random, p_err: float = 0.35,
                             slips: dict[str, float] | None = None) -> list[str]:
    """A full solution in which every operation step slips independently with probability ``p_err``
    (:func:`_wrong_op_step`, kinds weighted ``slips``), each later step carrying on correctly from the
    value written before it; the first and answer steps slip now and then too. Dense negatives for PRM training: every wrong step
    is wrong *locally*, so the checker's local labels mark each one."""
    steps: list[str] = []
    v = problem.start
    if rng.random() < 0.05:
        v = perturb_number(rng, v)
    steps.append(first_step_text(problem.name, v, problem.item))
    for op in problem.ops:
        try:
            if op.apply(v) < 0:
                break
        except ValueError:
            break
        if rng.random() < p_err:
            text, v2 = _wrong_op_step(rng, op, v, problem.ops, slips)
        else:
            try:
                v2 = op.apply(v)
            except ValueError:
                break
            text = op_step_text(op, v, v2)
        if v2 < 0:
            break
        steps.append(text)
        v = v2
    r = rng.random()
    steps.append(answer_step_text(perturb_number(rng, v) if r < 0.05 else v))
    return steps
