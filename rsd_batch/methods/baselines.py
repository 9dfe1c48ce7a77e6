"""Single-model baselines: the target alone (`target_only`) or the draft alone (`draft_only`).

They decode step by step through the same engine as RSD, so `rsd` with every draft step accepted
is `draft_only` token for token, and with every step rejected it is `target_only`.
"""
from __future__ import annotations

from ..engine import SamplingParams, generate_steps, run_rounds, stopper_for
from . import Context, Method, Step, start_seq, to_result


def _single_model(role: str):
    def run(tasks, ctx: Context):
        lm, cfg = ctx.models[role], ctx.method
        params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
        stopper = stopper_for(lm.tokenizer, cfg)

        def round_fn(active):
            left = [cfg.max_steps - len(seq.steps) for seq in active]
            for seq, outs in zip(active, generate_steps(lm, active, params, stopper, left)):
                for out in outs:
                    seq.commit(out.tokens, Step(lm.decode(out.tokens), role), out.reason, cfg.max_steps)

        for seq in run_rounds(tasks, ctx.batch_size, cfg.refill, lambda t: start_seq(t, ctx, [lm]),
                              round_fn):
            yield to_result(seq, lm)

    return run


METHODS = [
    Method("target_only", lambda cfg: ("target",), _single_model("target")),
    Method("draft_only", lambda cfg: ("draft",), _single_model("draft")),
]
