"""Token-level speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched.

One round, for every sample at once: the draft proposes k tokens (one batched decode, keeping each
token's distribution q); the target scores all k positions and one more in one batched forward
(distributions p); proposal i is kept with probability min(1, p(x)/q(x)); at the first rejection a
token is drawn from the residual max(0, p − q) (normalised), and if all k are kept a bonus token is
drawn from p. The output is distributed exactly as the target's own sampling. Greedy: a proposal is
kept when it is the target's argmax, so the text equals greedy target_only.

Finishes at EOS or max_new_tokens (no step structure is imposed; `steps` are cut from the text).
"""
from __future__ import annotations

import torch

from ..engine import FixedLength, SamplingParams, distribution, draw, generate_step, run_rounds, score_tokens
from . import Context, Method, Step, same_vocab, split_steps, start_seq, target_only_flops, to_result


def run(tasks, ctx: Context):
    draft, target = ctx.models["draft"], ctx.models["target"]
    cfg = ctx.method
    same_vocab(draft, target, "sd")
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
    propose = FixedLength(cfg.speculative_tokens)

    def round_fn(active):
        proposals = generate_step(draft, active, params, propose, keep_probs=True)
        verdicts = score_tokens(target, active, [p.tokens for p in proposals])
        for seq, prop, logits in zip(active, proposals, verdicts):
            p = distribution(logits, params)  # [len(prop) + 1, V]
            kept, extra = [], None
            for i, (tok, q) in enumerate(zip(prop.tokens, prop.probs)):
                if params.greedy:
                    ok = tok == int(p[i].argmax())
                else:
                    ratio = float(p[i, tok]) / max(float(q[tok]), 1e-20)
                    ok = float(torch.rand((), generator=seq.generators["accept"])) < min(1.0, ratio)
                if not ok:
                    residual = (p[i] - q).clamp(min=0)
                    extra = int(p[i].argmax()) if params.greedy or residual.sum() <= 0 else \
                        draw(residual / residual.sum(), seq.generators["target"])
                    break
                kept.append(tok)
                if tok in draft.eos_ids:
                    break
            else:
                extra = int(p[len(prop.tokens)].argmax()) if params.greedy else \
                    draw(p[len(prop.tokens)], seq.generators["target"])
            if kept and kept[-1] in draft.eos_ids:
                extra = None
            new = (kept + ([extra] if extra is not None else []))[: seq.left]
            before = len(seq.tokens)
            # Both caches may hold proposals past the last kept one: forget them.
            seq.rewind("target", before + len(kept))
            seq.rewind("draft", before + len(kept))
            seq.ledger.draft.discarded_tokens += len(prop.tokens) - len(kept)
            if extra is not None and len(new) > len(kept):
                seq.ledger.target.generated_tokens += 1
            seq.extend(new, "target" if len(new) > len(kept) else "draft",
                       eos=bool(new) and new[-1] in target.eos_ids)

    for seq in run_rounds(tasks, ctx.batch_size, cfg.refill, lambda t: start_seq(t, ctx, [draft, target]),
                          round_fn):
        text = target.decode(seq.tokens[seq.prompt_len:])
        seq.steps = [Step(s, "target") for s in split_steps(text, cfg.step_delimiter)]
        seq.ledger.target_only_flops = 0 if seq.error else target_only_flops(target, seq)
        yield to_result(seq, target)


METHOD = Method("sd", lambda cfg: ("draft", "target"), run)
