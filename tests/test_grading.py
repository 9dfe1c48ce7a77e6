"""Grading on the real problem sets in ../shared/data: each reference solution, read as a model
output would be, must grade correct against its own gold answer through the dataset's preset
(field mapping + answer_format) — the test that the grader and the mappings are right."""
from __future__ import annotations

import re

import pytest

from conftest import make_config
from rsd_batch.grading import extract_answer, is_correct, reference_answer
from rsd_batch.problems import load_problems

# Rows whose reference states no extractable final answer, and why (asserted, so a change shows).
NO_REFERENCE = {
    "math500": (0, ""),
    "minerva_math": (0, ""),
    "gsm8k": (0, ""),
    "olympiadbench": (675, "its solutions are prose proofs with no \\boxed{} answer"),
    "gaokao2023en": (385, "the file has no solution column"),
}
# Rows with no gold answer at all: run, but not graded (null `correct`).
NO_GOLD = {"gaokao2023en": 2}  # HMMT2023General_9 and 052023SATS4_11 have answer ""


def _rows(name: str):
    cfg = make_config(f"dataset={name}").dataset
    table = load_problems(cfg).table
    return cfg, table.to_pylist()


def _solution(cfg, row) -> str | None:
    col = cfg.fields.solution
    text = (row["metadata"] or {}).get(col) if col else None
    if isinstance(text, list):  # OlympiadBench: a list of alternative solutions
        text = "\n\n".join(text)
    return text


@pytest.mark.parametrize("name", sorted(NO_REFERENCE))
def test_reference_solutions_grade_correct(name):
    cfg, rows = _rows(name)
    wrong, missing = [], 0
    for row in rows:
        ref = reference_answer(_solution(cfg, row), cfg.answer_format)
        if ref is None or row["answer"] is None:
            missing += 1
        elif not is_correct(ref, row["answer"]):
            wrong.append((row["id"], ref, row["answer"]))
    print(f"{name}: {len(rows)} rows, {len(rows) - missing} references graded, {len(wrong)} wrong, "
          f"{missing} without an extractable answer")
    assert wrong == []
    assert missing == NO_REFERENCE[name][0], NO_REFERENCE[name][1]
    assert sum(row["answer"] is None for row in rows) == NO_GOLD.get(name, 0)


def _strip_dollars(text: str) -> str:
    return re.sub(r"(?<!\\)\$", "", text)  # math delimiters, not an escaped dollar sign


@pytest.mark.parametrize("name", sorted(NO_REFERENCE))
def test_gold_answer_boxed_by_a_model_grades_correct(name):
    """Where there is no reference solution to check, the gold itself, written the way the prompt
    asks a model to (in \\boxed{}, with its unit when the set keeps one apart), must grade correct;
    the gold off by one must not."""
    cfg, rows = _rows(name)
    wrong, off_by_one = [], 0
    for row in rows:
        gold = row["answer"]
        if gold is None:
            continue
        unit = (row["metadata"] or {}).get("unit")
        body = _strip_dollars(gold)
        if unit and unit != "None":
            body += f" \\text{{ {_strip_dollars(unit)}}}" if unit != "%" else "\\%"
        pred = extract_answer(f"So the final answer is $\\boxed{{{body}}}$.")
        if not is_correct(pred, gold):
            wrong.append((row["id"], pred, gold))
        if re.fullmatch(r"-?\d+", gold.strip("$ ")):
            off_by_one += 1
            assert is_correct(str(int(gold.strip("$ ")) + 1), gold) is False, (row["id"], gold)
    assert wrong == []
    assert off_by_one > 0 or name == "minerva_math"


@pytest.mark.parametrize("pred,gold,expected", [
    ("45 \\text{ minutes}", "45", True),
    ("\\frac{41}{12}\\text{ km}", "\\frac{41}{12}", True),
    ("4.2\\%", "4.2", True),  # a percent sign as the unit
    ("42\\%", "4.2", False),
    ("0.5", "\\frac12", True),
    ("48, 384", "$48$, $384$", True),  # OlympiadBench / GaoKao multiple answers
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("1,000", "1000", True),
    ("3", "4", False),
    (None, "4", False),  # no \boxed{} in the output
    ("4", None, None),  # no gold: not graded
])
def test_equivalence_cases(pred, gold, expected):
    assert is_correct(pred, gold) is expected
