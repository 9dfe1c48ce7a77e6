"""Methods on the toy world, in one run: accuracy, FLOPs, wall time, acceptance; batched vs one by one.

    python benchmarks/bench_methods.py [--limit 500] [--batch-size 64] [--loop-limit 64] [--repeats 3]

Every method decodes the same held-out problems (conf/dataset/toy_arith) with the shipped toy models,
greedy, in this process; ratios are against target_only measured in the same run. Then RSD at the
paper's δ=0.7 runs step-batched (batch 64) and as a per-problem loop (batch 1) over the first
`loop-limit` problems: same outputs, and the speed-up. Then target_only and RSD δ=0.7 again, in turn,
`repeats` times: the wall-time ratio of each pair and their median (one run's wall time moves by
about ±1 s here). Last, tokens processed per role divided by the final tokens (prompt + output for
the policies; the formatted problem + final steps for the PRM).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from rsd_batch.config import ROOT  # noqa: E402
from rsd_batch.grading import extract_answer, is_correct  # noqa: E402
from rsd_batch.methods import Context, Task, get_method  # noqa: E402
from rsd_batch.problems import load_problems  # noqa: E402
from rsd_batch.runner import load_models  # noqa: E402

POINTS = [("draft_only", []), ("target_only", []),
          *[(f"rsd δ={d}", ["method.name=rsd", f"method.threshold={d}"]) for d in (0.3, 0.5, 0.7, 0.9)],
          # the target rewriting every round instead of when a batch's worth waits (method.rewrite_share)
          ("rsd δ=0.7, rewrite every round", ["method.name=rsd", "method.threshold=0.7", "method.rewrite_share=0"]),
          # the ceiling: the toy checker as the PRM (an upper bound, costs nothing)
          ("rsd δ=0.7, oracle PRM", ["method.name=rsd", "method.threshold=0.7", "prm=oracle"]),
          # the oracle's verdicts at the learned PRM's cost (it runs, its rewards are dropped): the best
          # a PRM of the shipped size could do, so PRM quality and PRM cost are told apart
          ("rsd δ=0.7, oracle verdicts at the PRM's cost", ["method.name=rsd", "method.threshold=0.7", "prm=oracle"])]
PAID = "rsd δ=0.7, oracle verdicts at the PRM's cost"


def paid_oracle(learned, oracle):
    """A PRM that runs `learned` (its forwards, caches and ledger) and answers with `oracle`'s verdicts."""
    import dataclasses
    import types

    def score_steps(prm, seqs, candidates, max_batch_tokens):
        learned.backend.score_steps(learned, seqs, candidates, max_batch_tokens)
        return oracle.backend.score_steps(oracle, seqs, candidates, max_batch_tokens)

    return dataclasses.replace(learned, backend=types.SimpleNamespace(score_steps=score_steps))


def config(*overrides):
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def run_point(overrides, tasks, batch_size, models, prm=None):
    cfg = config(*overrides, f"run.batch_size={batch_size}")
    method = get_method(cfg.method.name.value)
    prm = prm or ("oracle" if cfg.prm.format == "oracle" else "prm")
    chosen = {r: models[prm if r == "prm" else r] for r in method.roles(cfg.method)}
    ctx = Context(chosen, cfg.method, cfg.prompt, cfg.run.seed, batch_size)
    t0 = time.perf_counter()
    results = dict(method.run(tasks, ctx))
    return results, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loop-limit", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.target.path=...")
    args = ap.parse_args()
    base = config(*args.overrides)
    table = load_problems(base.dataset).table.slice(0, args.limit)
    tasks = [Task(i, 0, p) for i, p in zip(table["id"].to_pylist(), table["problem"].to_pylist())]
    gold = dict(zip(table["id"].to_pylist(), table["answer"].to_pylist()))
    models = load_models(base, ("draft", "target", "prm"))
    models["oracle"] = load_models(config(*args.overrides, "prm=oracle"), ("prm",))["prm"]
    models[PAID] = paid_oracle(models["prm"], models["oracle"])
    rows, outputs = [], {}
    for name, over in POINTS:
        if name in ("draft_only", "target_only"):
            over = [f"method={name}"]
        res, secs = run_point([*args.overrides, *over], tasks, args.batch_size, models, PAID if name == PAID else None)
        outputs[name] = res
        acc = sum(bool(is_correct(extract_answer(r.output), gold[t.id])) for t, r in res.items()) / len(res)
        flops = sum(r.ledger.flops for r in res.values())
        drafted = [s for r in res.values() for s in r.steps if s.accepted is not None]  # RSD's decisions
        accepted = [s for s in drafted if s.accepted]
        rows.append((name, acc, flops, secs, len(accepted) / len(drafted) if drafted else None))
    ref = next(r for r in rows if r[0] == "target_only")
    import os
    import torch
    print(f"\n{len(tasks)} toy problems, greedy, batch {args.batch_size}, one process on this machine, torch threads "
          f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n")
    print("| method | accuracy | FLOPs (all roles) | FLOPs vs target_only | wall s | wall vs target_only "
          "| draft steps accepted |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, acc, flops, secs, rate in rows:
        print(f"| {name} | {acc:.1%} | {flops:.3e} | {ref[2] / flops:.2f}× fewer | {secs:.1f} | "
              f"{ref[3] / secs:.2f}× faster | {'' if rate is None else f'{rate:.1%}'} |")

    loop_tasks = tasks[: args.loop_limit]
    over = [*args.overrides, "method.name=rsd", "method.threshold=0.7"]
    batched, t_batched = run_point(over, loop_tasks, args.batch_size, models)
    loop, t_loop = run_point(over, loop_tasks, 1, models)
    same = sum(batched[t].output == loop[t].output for t in loop_tasks)
    print(f"\nRSD δ=0.7 on {len(loop_tasks)} problems: step-batched (batch {args.batch_size}) {t_batched:.1f} s, "
          f"per-problem loop {t_loop:.1f} s -> {t_loop / t_batched:.1f}× ; identical outputs {same}/{len(loop_tasks)}")

    pairs = []
    for _ in range(args.repeats):
        (_, t_target), (_, t_rsd) = (run_point([*args.overrides, *o], tasks, args.batch_size, models)
                                     for o in (["method=target_only"], over))
        pairs.append((t_target, t_rsd))
    if pairs:
        ratios = sorted(t / r for t, r in pairs)
        print(f"\ntarget_only / RSD δ=0.7 wall, in turn {len(pairs)}×: "
              + ", ".join(f"{t:.1f} s / {r:.1f} s = {t / r:.2f}×" for t, r in pairs)
              + f"; median {ratios[len(ratios) // 2]:.2f}×")

    res = outputs["rsd δ=0.7"]
    prm = models["prm"]
    print("\n| role | tokens processed | final tokens | processed / final |\n|---|---:|---:|---:|")
    for role in ("draft", "target", "prm"):
        done = sum(r.ledger.role(role).prefill_tokens + r.ledger.role(role).decode_tokens for r in res.values())
        if role == "prm":
            final = sum(len(prm.adapter.encode(t.problem, [s.text for s in r.steps])[0]) for t, r in res.items())
        else:
            lm = models[role]
            final = sum(len(lm.encode(lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": t.problem}], tokenize=False, add_generation_prompt=True)))
                + r.ledger.draft.generated_tokens - r.ledger.draft.discarded_tokens
                + r.ledger.target.generated_tokens for t, r in res.items())
        print(f"| {role} | {done:,} | {final:,} | {done / final:.2f} |")


if __name__ == "__main__":
    main()
