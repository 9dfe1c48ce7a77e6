"""Decoding methods: small strategies over the engine, one per file, selected by `method.name`.

A method turns an iterable of `Task`s into `(task, Result)` pairs, yielded as samples finish (the
runner commits them in batches). It never touches files or launchers; the runner owns those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from ..config import MethodConfig, PromptConfig
from ..engine import Seq, sample_generator
from ..ledger import Ledger
from ..models import LoadedModel, render_prompt


@dataclass(frozen=True)
class Task:
    id: str
    sample_index: int
    problem: str


@dataclass
class Step:
    text: str
    source: str  # the model that wrote it: draft | target
    reward: Optional[float] = None  # the PRM's score of this text, when it scored it
    accepted: Optional[bool] = None  # RSD: a draft step the PRM let through
    rejected_text: Optional[str] = None  # RSD: the draft step this target step replaced
    rejected_reward: Optional[float] = None


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
    batch_size: int

    def __post_init__(self):
        from omegaconf import DictConfig, OmegaConf

        if isinstance(self.method, DictConfig):  # its reads cost ~20 µs each, and methods read it per step
            self.method = OmegaConf.to_object(self.method)


@dataclass(frozen=True)
class Method:
    name: str
    needs: Callable[[MethodConfig], tuple[str, ...]]  # the models it uses: only these are loaded
    run: Callable[[Iterable[Task], Context], Iterator[tuple[Task, Result]]]

    def roles(self, cfg: MethodConfig) -> tuple[str, ...]:
        return self.needs(cfg)


def generators(seed: int, task: Task, tag: str = "") -> dict:
    """The sample's own random generators, one per role (`tag` tells a search's candidates apart)."""
    return {role: sample_generator(seed, task.id, task.sample_index, role + tag)
            for role in ("draft", "target", "accept")}


def same_vocab(a: LoadedModel, b: LoadedModel, method: str) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise ValueError(f"{method} needs the draft and the target to share one tokenizer (the paper's "
                         "pairs do: Qwen2.5-Math 1.5B/7B/72B); these two differ")


def start_seq(task: Task, ctx: Context, policies: list[LoadedModel], tag: str = "") -> Seq:
    """A new sequence: the prompt through the (first) policy's chat template, one generator per role."""
    lm = policies[0]
    prompt = lm.encode(render_prompt(lm.tokenizer, task.problem, ctx.prompt))
    room = min(p.max_context for p in policies) - len(prompt)
    gens = generators(ctx.seed, task, tag)
    seq = Seq(key=task, problem=task.problem, tokens=prompt, prompt_len=len(prompt),
              budget=min(ctx.method.max_new_tokens, room), generators=gens)
    if room <= 0:
        seq.finish_reason = "error"
        seq.error = (f"the prompt has {len(prompt)} tokens; the context is "
                     f"{min(p.max_context for p in policies)} (model.<role>.max_context)")
    return seq


def to_result(seq: Seq, lm: LoadedModel) -> tuple[Task, Result]:
    seq.ledger.latency_seconds = (seq.finished_at or seq.started) - seq.started
    output = lm.decode(seq.tokens[seq.prompt_len:])
    return seq.key, Result(output, seq.steps, seq.finish_reason, seq.ledger, seq.error)


def target_only_flops(target: LoadedModel, seq: Seq) -> int:
    """What the target alone would spend on this prompt and output: a prefill of the prompt (logits at
    its last token), then a decode for every generated token but the last."""
    decoded = max(seq.generated - 1, 0)
    return target.cost.forward_flops(seq.prompt_len, 0, 1) + target.cost.forward_flops(decoded, seq.prompt_len, decoded)


def split_steps(text: str, delimiter: str) -> list[str]:
    """Steps of a solution text, each keeping its trailing delimiter (the last may have none)."""
    parts = text.split(delimiter)
    steps = [p + delimiter for p in parts[:-1]]
    if parts[-1]:
        steps.append(parts[-1])
    return steps


def get_method(name: str) -> Method:
    from . import baselines, rsd, sd, search

    methods = {m.name: m for m in (*baselines.METHODS, rsd.METHOD, sd.METHOD, *search.METHODS)}
    if name not in methods:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(methods))}")
    return methods[name]
