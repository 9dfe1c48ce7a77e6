"""Seeded generator of multi-step arithmetic word problems (the toy world's data).

A problem is a start value and a chain of operations. The text reads like
"Ann has 23 coins. She buys 5 more. She triples them. ... How many coins does Ann have now?"
and the reference solution is one step per sentence, steps separated by ``"\\n\\n"``::

    Ann starts with 23 coins.

    She buys 5 more: 23 + 5 (3+5+0=8,2+0+0=2) = 28.

    She triples them: 28 * 3 (8*3+0=24,2*3+2=8) = 84.

    The answer is \\boxed{84}.

Every operation step is *worked digit by digit*: in parentheses, one column per digit of the result,
least-significant first, each a one-digit fact with its carry (``+``: ``da+db+carry=s``; ``*``:
``da*b+carry=s``; ``-``: ``x-db-borrow=w`` with ``x`` the digit plus 10 when it borrows), then the
result. So producing a step takes a chain of small lookups, and checking one is local: every column
is a one-digit fact next to its inputs (:func:`worked_columns`).

Difficulty knobs live in :class:`ProblemConfig` (number of operations, operand ranges,
operators, value cap). Everything is a pure function of ``(config, seed, index)``: problem
``i`` of a set is drawn from its own ``random.Random`` seeded with a string key made of the
*stream name*, the seed and ``i``. Training sets use the stream ``"train"``, held-out test sets
the stream ``"test"``; the two streams never share a generator state, and on top of that
:func:`generate_problems` can be given the set of problem texts to exclude (the shipped test
file is excluded from training data by text, so disjointness holds by construction and by check).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

NAMES = [
    ("Ann", "She", "her"), ("Ben", "He", "his"), ("Cara", "She", "her"), ("Dan", "He", "his"),
    ("Eva", "She", "her"), ("Finn", "He", "his"), ("Gina", "She", "her"), ("Hugo", "He", "his"),
    ("Iris", "She", "her"), ("Jack", "He", "his"), ("Kim", "She", "her"), ("Leo", "He", "his"),
    ("Mia", "She", "her"), ("Noah", "He", "his"), ("Olga", "She", "her"), ("Paul", "He", "his"),
]
ITEMS = ["coins", "apples", "stamps", "marbles", "cards", "books", "shells", "pens", "beads", "stickers"]

# operator -> sentence templates ({p} = pronoun, {b} = operand)
ADD_TEMPLATES = ["{p} buys {b} more.", "{p} finds {b} more.", "{p} gets {b} more.", "{p} wins {b} more."]
SUB_TEMPLATES = ["{p} gives away {b}.", "{p} loses {b}.", "{p} sells {b}.", "{p} uses {b}."]
MUL_WORDS = {2: "doubles", 3: "triples"}
MUL_TEMPLATES = ["{p} {w} them.", "{p} multiplies them by {b}."]
DIV_TEMPLATES = ["{p} splits them into {b} equal piles and keeps one pile."]

OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
SYMBOL_OP = {v: k for k, v in OP_SYMBOL.items()}
STEP_SEP = "\n\n"


@dataclass
class ProblemConfig:
    """Difficulty knobs of the generator."""

    min_ops: int = 2
    max_ops: int = 4
    start_min: int = 10
    start_max: int = 99
    add_min: int = 2
    add_max: int = 20
    sub_min: int = 2
    sub_max: int = 20
    mul_min: int = 2
    mul_max: int = 3
    div_min: int = 2
    div_max: int = 9
    max_value: int = 199
    operators: List[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    # relative weights of the operators (same order as ``operators``); None = uniform
    op_weights: Optional[List[float]] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["operators"] = list(self.operators)
        d["op_weights"] = None if self.op_weights is None else list(self.op_weights)
        return d


@dataclass
class Op:
    kind: str  # add | sub | mul | div
    operand: int
    sentence: str  # the problem sentence, e.g. "She buys 5 more."

    @property
    def symbol(self) -> str:
        return OP_SYMBOL[self.kind]

    def apply(self, value: int) -> int:
        return apply_op(self.kind, value, self.operand)


@dataclass
class Problem:
    id: str
    name: str
    pronoun: str
    item: str
    start: int
    ops: list[Op] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def values(self) -> list[int]:
        """Running values: values[0] = start, values[i] = after op i."""
        vals = [self.start]
        for op in self.ops:
            vals.append(op.apply(vals[-1]))
        return vals

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def text(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}."]
        parts += [op.sentence for op in self.ops]
        parts.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(parts)

    def reference_steps(self) -> list[str]:
        vals = self.values
        steps = [first_step_text(self.name, self.start, self.item)]
        for i, op in enumerate(self.ops):
            steps.append(op_step_text(op, vals[i], vals[i + 1]))
        steps.append(answer_step_text(vals[-1]))
        return steps

    @property
    def solution(self) -> str:
        return STEP_SEP.join(self.reference_steps())

    def to_record(self) -> dict:
        return {
            "id": self.id,
            "problem": self.text,
            "answer": str(self.answer),
            "solution": self.solution,
            "num_ops": len(self.ops),
            "operators": ",".join(op.kind for op in self.ops),
            "start": self.start,
            "ops": json.dumps([[op.kind, op.operand, op.sentence] for op in self.ops]),
            "name": self.name,
            "pronoun": self.pronoun,
            "item": self.item,
        }

    @classmethod
    def from_record(cls, rec: dict) -> "Problem":
        ops = [Op(k, int(b), s) for k, b, s in json.loads(rec["ops"])]
        return cls(id=str(rec["id"]), name=rec["name"], pronoun=rec["pronoun"], item=rec["item"],
                   start=int(rec["start"]), ops=ops)


def apply_op(kind: str, a: int, b: int) -> int:
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    if kind == "div":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not exact")
        return a // b
    raise ValueError(kind)


def first_step_text(name: str, start: int, item: str) -> str:
    return f"{name} starts with {start} {item}."


def _digits(n: int) -> list[int]:
    """Digits of ``n`` >= 0, least-significant first."""
    return [int(d) for d in reversed(str(n))]


def worked_columns(kind: str, a: int, b: int, fault: tuple[int, int] | None = None) -> tuple[list[str], int]:
    """The worked columns of ``a kind b`` (least-significant digit first) and the result they spell.

    ``fault = (i, value)`` writes ``value`` instead of the right sum/difference in column ``i`` (when
    there is one) and carries on *consistently* from it, as a policy that slips once would: the
    columns after it and the result follow the wrong value. Returns ``(columns, result)``.
    """
    da = _digits(a)
    cols: list[str] = []
    out: list[int] = []
    if kind == "add":
        db = _digits(b)
        n = max(len(da), len(db))
        carry = 0
        i = 0
        while i < n or carry:
            x = da[i] if i < len(da) else 0
            y = db[i] if i < len(db) else 0
            s = x + y + carry
            if fault is not None and fault[0] == i:
                s = fault[1]
            cols.append(f"{x}+{y}+{carry}={s}")
            out.append(s % 10)
            carry = s // 10
            i += 1
    elif kind == "mul":
        carry = 0
        i = 0
        while i < len(da) or carry:
            x = da[i] if i < len(da) else 0
            s = x * b + carry
            if fault is not None and fault[0] == i:
                s = fault[1]
            cols.append(f"{x}*{b}+{carry}={s}")
            out.append(s % 10)
            carry = s // 10
            i += 1
    elif kind == "sub":
        db = _digits(b)
        borrow = 0
        for i in range(max(len(da), len(db))):
            x = da[i] if i < len(da) else 0
            y = db[i] if i < len(db) else 0
            nb = 1 if x - y - borrow < 0 else 0
            x += 10 * nb
            w = x - y - borrow
            if fault is not None and fault[0] == i:
                w = fault[1]
            cols.append(f"{x}-{y}-{borrow}={w}")
            out.append(w % 10)
            borrow = nb
    else:  # no worked form: the result alone
        return [], apply_op(kind, a, b)
    return cols, int("".join(str(d) for d in reversed(out)) or "0")


def op_step_text(op: Op, a: int, c: int | None = None, fault: tuple[int, int] | None = None,
                 kind: str | None = None, b: int | None = None) -> str:
    """``"{sentence}: a op b (columns) = c."`` for ``op`` applied to ``a`` (its worked columns always those
    of ``a kind b``, with ``fault`` if given; ``c`` defaults to the result the columns spell)."""
    kind = kind or op.kind
    b = op.operand if b is None else b
    cols, spelled = worked_columns(kind, a, b, fault)
    c = spelled if c is None else c
    return f"{op.sentence[:-1]}: {a} {OP_SYMBOL[kind]} {b} ({','.join(cols)}) = {c}."


def answer_step_text(n: int | str) -> str:
    return f"The answer is \\boxed{{{n}}}."


def _rng(stream: str, seed: int, index: int) -> random.Random:
    key = f"rsd_batch.toy/{stream}/{seed}/{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _feasible_ops(cfg: ProblemConfig, value: int) -> list[tuple[str, int, int]]:
    """(kind, lo, hi) operand ranges that keep the value in [1, max_value]."""
    out = []
    for kind in cfg.operators:
        if kind == "add":
            lo, hi = cfg.add_min, min(cfg.add_max, cfg.max_value - value)
        elif kind == "sub":
            lo, hi = cfg.sub_min, min(cfg.sub_max, value - 1)
        elif kind == "mul":
            lo, hi = cfg.mul_min, min(cfg.mul_max, cfg.max_value // max(value, 1))
        elif kind == "div":
            lo, hi = cfg.div_min, min(cfg.div_max, value)
            if not any(value % b == 0 for b in range(lo, hi + 1)):
                continue
        else:
            raise ValueError(f"unknown operator {kind!r}")
        if lo <= hi:
            out.append((kind, lo, hi))
    return out


def make_problem(cfg: ProblemConfig, seed: int, index: int, stream: str = "train") -> Problem:
    """Problem ``index`` of the ``(stream, seed)`` sequence; a pure function of its arguments."""
    rng = _rng(stream, seed, index)
    name, pronoun, _poss = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = rng.randint(cfg.start_min, min(cfg.start_max, cfg.max_value))
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    weights = dict(zip(cfg.operators, cfg.op_weights or [1.0] * len(cfg.operators)))
    ops: list[Op] = []
    value = start
    for _ in range(n_ops):
        feasible = _feasible_ops(cfg, value)
        if not feasible:
            break
        kind, lo, hi = rng.choices(feasible, weights=[weights[k] for k, _, _ in feasible])[0]
        if kind == "div":
            b = rng.choice([b for b in range(lo, hi + 1) if value % b == 0])
        else:
            b = rng.randint(lo, hi)
        if kind == "add":
            sent = rng.choice(ADD_TEMPLATES).format(p=pronoun, b=b)
        elif kind == "sub":
            sent = rng.choice(SUB_TEMPLATES).format(p=pronoun, b=b)
        elif kind == "mul":
            if b in MUL_WORDS and rng.random() < 0.5:
                sent = MUL_TEMPLATES[0].format(p=pronoun, w=MUL_WORDS[b])
            else:
                sent = MUL_TEMPLATES[1].format(p=pronoun, b=b)
        else:
            sent = DIV_TEMPLATES[0].format(p=pronoun, b=b)
        op = Op(kind, b, sent)
        ops.append(op)
        value = op.apply(value)
    return Problem(id=f"toy-{stream}-{seed}-{index:07d}", name=name, pronoun=pronoun, item=item,
                   start=start, ops=ops, config=cfg.to_dict())


def generate_problems(n: int, cfg: ProblemConfig | None = None, seed: int = 0, stream: str = "train",
                      exclude: Iterable[str] = (), start_index: int = 0) -> list[Problem]:
    """``n`` problems of the ``(stream, seed)`` sequence, skipping any whose text is in ``exclude``."""
    cfg = cfg or ProblemConfig()
    excl = set(exclude)
    out: list[Problem] = []
    i = start_index
    while len(out) < n:
        p = make_problem(cfg, seed, i, stream)
        i += 1
        if p.text in excl:
            continue
        out.append(p)
    return out


def write_problem_set(problems: Sequence[Problem], path: str | Path) -> list[Path]:
    """Write ``problems`` as JSONL (``.jsonl``) or Arrow IPC (``.arrow``); with no suffix, both.

    Columns: id, problem, answer, solution (str) plus knob metadata (num_ops, operators, start,
    ops as JSON, name, pronoun, item) from which :meth:`Problem.from_record` rebuilds the problem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [p.to_record() for p in problems]
    targets = [path] if path.suffix in (".jsonl", ".arrow") else [path.with_suffix(".jsonl"), path.with_suffix(".arrow")]
    for t in targets:
        if t.suffix == ".jsonl":
            with open(t, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa

            table = pa.Table.from_pylist(records)
            with pa.OSFile(str(t), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
    return targets


def read_problem_set(path: str | Path) -> list[Problem]:
    """Read a file written by :func:`write_problem_set` (JSONL or Arrow IPC)."""
    path = Path(path)
    if path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as src:
            records = pa.ipc.open_file(src).read_all().to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    return [Problem.from_record(r) for r in records]


def training_corpus(n: int = 2000, cfg: ProblemConfig | None = None, seed: int = 0) -> Iterable[str]:
    """Texts for the tokenizer trainer: problems, solutions and PRM-formatted solutions."""
    for p in generate_problems(n, cfg, seed=seed, stream="tokenizer"):
        steps = p.reference_steps()
        yield p.text
        yield p.solution
        yield p.text + " " + "".join(s.strip() + " ки\n" for s in steps)
