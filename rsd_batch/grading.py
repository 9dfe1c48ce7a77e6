"""Answer extraction and equivalence: `\\boxed{}` / GSM8K `####` gold answers, math-verify checks.

Grading happens as samples finish (in the runner), so a merge of a million rows only sums booleans.
"""
from __future__ import annotations

import re
from typing import Optional

from .config import AnswerFormat

_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)
_PERCENT = re.compile(r"\s*(\\?%|\\text\{\s*\\?%\s*\}|\\percent)\s*$")


def last_boxed(text: Optional[str]) -> Optional[str]:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None  # unbalanced: the output was cut off inside the box


def gold_answer(raw: Optional[str], fmt: AnswerFormat) -> Optional[str]:
    """The gold answer in a source field, read as the dataset config says."""
    if raw is None:
        return None
    if fmt == AnswerFormat.boxed:
        return last_boxed(raw)
    if fmt == AnswerFormat.gsm8k:
        m = _GSM8K.search(raw)
        return m.group(1).replace(",", "").strip() if m else None
    return raw.strip() or None


def extract_answer(output: str) -> Optional[str]:
    """The model's final answer: the last \\boxed{} (the prompt format every preset asks for)."""
    return last_boxed(output)


def reference_answer(solution: Optional[str], fmt: AnswerFormat) -> Optional[str]:
    """The final answer a dataset's reference solution states, read as a model output would be
    (GSM8K rationales state theirs after ``####``); None if it states none (e.g. a prose proof)."""
    if not solution:
        return None
    if fmt == AnswerFormat.gsm8k:
        return gold_answer(solution, fmt)
    return extract_answer(solution)


def _as_math(text: str) -> str:
    text = text.strip()
    if text.startswith("$") and text.endswith("$"):
        text = text.strip("$")
    return f"\\boxed{{{text}}}"


def is_correct(prediction: Optional[str], gold: Optional[str]) -> Optional[bool]:
    """math-verify equivalence; None when there is no gold to compare with."""
    if gold is None:
        return None
    if prediction is None:
        return False
    if prediction.strip() == gold.strip():
        return True
    from math_verify import parse, verify
    try:
        if verify(parse(_as_math(gold)), parse(_as_math(prediction))):
            return True
        # A percent sign is a unit when the gold has none (OlympiadBench keeps units apart: "4.2"
        # with unit "%"); math-verify would read "4.2\%" as 0.042.
        bare = _PERCENT.sub("", prediction)
        return bare != prediction and "%" not in gold and bool(verify(parse(_as_math(gold)),
                                                                       parse(_as_math(bare))))
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer, not a crash
        return False
