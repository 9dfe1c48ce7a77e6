"""Single-model baselines: the target alone (`target_only`) or the draft alone (`draft_only`)."""
from __future__ import annotations

import time

from ..engine import Row, SamplingParams, generate, sample_generator
from ..ledger import Ledger
from ..models import render_prompt
from . import Context, Method, Result, Step, Task, split_steps


def _single_model(role: str):
    def run(tasks: list[Task], ctx: Context) -> list[Result]:
        lm, cfg = ctx.models[role], ctx.method
        params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
        results: list[Result] = []
        rows: list[tuple[int, Row]] = []
        for t in tasks:
            ledger = Ledger()
            results.append(Result(output="", steps=[], finish_reason="error", ledger=ledger))
            prompt = lm.encode(render_prompt(lm.tokenizer, t.problem, ctx.prompt))
            room = lm.max_context - len(prompt)
            if room <= 0:
                results[-1].error = (f"the prompt has {len(prompt)} tokens; the {role} model's "
                                     f"context is {lm.max_context} (model.{role}.max_context)")
                continue
            gen = sample_generator(ctx.seed, t.id, t.sample_index, role)
            rows.append((len(results) - 1, Row(prompt, gen, ledger.role(role),
                                               min(cfg.max_new_tokens, room))))
        start = time.perf_counter()
        generate(lm, [r for _, r in rows], params)
        for i, row in rows:
            text = lm.decode(row.new_ids)
            res = results[i]
            res.output = text
            res.steps = [Step(s, role) for s in split_steps(text, cfg.step_delimiter)]
            res.finish_reason = row.finish_reason
            res.ledger.latency_seconds = row.finished_at - start
        return results

    return run


METHODS = [
    Method("target_only", ("target",), _single_model("target")),
    Method("draft_only", ("draft",), _single_model("draft")),
]
