"""Decoding methods: small strategies over the engine, one per file, selected by `method.name`.

A method turns a batch of `Task`s into one `Result` per task, using the models in `Context`.
It never touches files or launchers; the runner owns those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from ..config import MethodConfig, PromptConfig
from ..ledger import Ledger
from ..models import LoadedModel


@dataclass(frozen=True)
class Task:
    id: str
    sample_index: int
    problem: str


@dataclass
class Step:
    text: str
    source: str  # the role whose text it is: draft | target
    reward: Optional[float] = None  # the PRM's score, when it scored the step
    accepted: Optional[bool] = None  # RSD: whether a draft step was kept


@dataclass
class Result:
    output: str
    steps: list[Step]
    finish_reason: str  # eos | max_tokens | max_steps | error
    ledger: Ledger = field(default_factory=Ledger)
    error: Optional[str] = None


@dataclass
class Context:
    models: dict[str, LoadedModel]
    method: MethodConfig
    prompt: PromptConfig
    seed: int


@dataclass(frozen=True)
class Method:
    name: str
    roles: tuple[str, ...]  # the models it needs: only these are loaded and fingerprinted
    run: Callable[[list[Task], Context], list[Result]]


def split_steps(text: str, delimiter: str) -> list[str]:
    """Steps of a solution text, each keeping its trailing delimiter (the last may have none)."""
    parts = text.split(delimiter)
    steps = [p + delimiter for p in parts[:-1]]
    if parts[-1]:
        steps.append(parts[-1])
    return [s for s in steps if s.strip()] or ([text] if text else [])


def get_method(name: str) -> Method:
    from . import baselines

    methods = {m.name: m for m in baselines.METHODS}
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]
