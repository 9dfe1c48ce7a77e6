"""Engines, in one run on the toy world: output tokens/s of the target alone and wall time of RSD, for
engine=hf, engine=vllm and their anchors (HF `model.generate`, plain `vllm.LLM.generate`).

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_engines.py [--limit 500] [--batch-size 64] [--repeats 3]

Greedy, the same held-out problems and prompts for every row, batches of `--batch-size` prompts,
`--repeats` rounds with the rows interleaved, median reported. The anchors decode whole solutions
with no step structure (what a user would run instead). vLLM rows need vLLM (the vLLM environment);
without it only the HF rows print. Outputs are compared: the same texts from every row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from rsd_batch.config import ROOT  # noqa: E402
from rsd_batch.methods import Context, Task, get_method  # noqa: E402
from rsd_batch.models import render_prompt  # noqa: E402
from rsd_batch.problems import load_problems  # noqa: E402
from rsd_batch.runner import load_models  # noqa: E402


def config(*overrides):
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def run_method(models, overrides, tasks, batch_size):
    cfg = config(*overrides)
    method = get_method(cfg.method.name.value)
    ctx = Context({r: models[r] for r in method.roles(cfg.method)}, cfg.method, cfg.prompt, cfg.run.seed, batch_size)
    t0 = time.perf_counter()
    res = dict(method.run(tasks, ctx))
    secs = time.perf_counter() - t0
    return [res[t].output for t in tasks], sum(r.ledger.target.generated_tokens + r.ledger.draft.generated_tokens
                                                          - r.ledger.draft.discarded_tokens for r in res.values()), secs


@torch.inference_mode()
def hf_generate(lm, prompts, batch_size, max_new):
    """HF `model.generate`, left-padded batches, greedy, stopping at EOS."""
    outs, n, t0 = [], 0, time.perf_counter()
    tok = lm.tokenizer
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[lm.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        gen = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                eos_token_id=sorted(lm.eos_ids), pad_token_id=lm.pad_id)
        for row in gen[:, width:].tolist():
            row = row[:next((j + 1 for j, t in enumerate(row) if t in lm.eos_ids), len(row))]
            n += len(row)
            outs.append(tok.decode(row, skip_special_tokens=True))
    return outs, n, time.perf_counter() - t0


def vllm_generate(llm, eos, prompts, batch_size, max_new):
    """Plain `vllm.LLM.generate` on the same token prompts, in the same batches."""
    import vllm
    from vllm.inputs import TokensPrompt

    sp = vllm.SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=sorted(eos))
    outs, n, t0 = [], 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        for o in llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i:i + batch_size]], sp, use_tqdm=False):
            n += len(o.outputs[0].token_ids)
            outs.append(o.outputs[0].text)
    return outs, n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm-dtype", default="float32", help="the vLLM engines' dtype (bfloat16 is faster on AVX-512)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    base = config(*args.overrides)
    table = load_problems(base.dataset).table.slice(0, args.limit)
    tasks = [Task(i, 0, p) for i, p in zip(table["id"].to_pylist(), table["problem"].to_pylist())]
    roles = ("draft", "target", "prm")
    hf = load_models(base, roles)
    try:
        import vllm  # noqa: F401
        have_vllm = True
    except ImportError:
        have_vllm = False
    vl_over = ["engine=vllm", "engine.enforce_eager=true", "engine.kv_cache_memory_bytes=268435456",
               f"model.draft.dtype={args.vllm_dtype}", f"model.target.dtype={args.vllm_dtype}",
               f"prm.dtype={args.vllm_dtype}"]
    vl = load_models(config(*args.overrides, *vl_over), roles) if have_vllm else None
    target = hf["target"]
    prompts = [target.encode(render_prompt(target.tokenizer, t.problem, base.prompt)) for t in tasks]
    max_new = base.method.max_new_tokens
    bs = args.batch_size
    rows = {
        "target: HF model.generate": lambda: hf_generate(target, prompts, bs, max_new),
        "target: engine=hf": lambda: run_method(hf, ["method=target_only"], tasks, bs),
    }
    if vl:
        rows["target: plain vllm.LLM.generate"] = lambda: vllm_generate(vl["target"].model, vl["target"].eos_ids,
                                                                       prompts, bs, max_new)
        rows["target: engine=vllm"] = lambda: run_method(vl, ["method=target_only"], tasks, bs)
    rows["rsd δ=0.7: engine=hf"] = lambda: run_method(hf, ["method=rsd"], tasks, bs)
    if vl:
        rows["rsd δ=0.7: engine=vllm"] = lambda: run_method(vl, ["method=rsd"], tasks, bs)
    times = {k: [] for k in rows}
    outputs, tokens = {}, {}
    for _ in range(args.repeats):  # interleaved: a slow moment of the machine hits every row alike
        for name, fn in rows.items():
            out, n, secs = fn()
            times[name].append(secs)
            outputs[name], tokens[name] = out, n
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_target = outputs["target: HF model.generate"]
    ref_rsd = outputs["rsd δ=0.7: engine=hf"]

    def same(name):
        want = ref_rsd if name.startswith("rsd") else ref_target
        return f"{sum(a == b for a, b in zip(outputs[name], want))}/{len(want)}"

    print(f"\n{len(tasks)} toy problems, greedy, batch {bs}, {args.repeats} interleaved repeats (median), "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"vLLM dtype {args.vllm_dtype if vl else '-'}\n")
    print("| row | wall s | output tok/s | vs HF generate | vs engine=hf | same outputs |\n|---|---:|---:|---:|---:|---:|")
    for name in rows:
        rate = tokens[name] / med[name]
        if name.startswith("target"):
            vs_gen = f"{rate / (tokens['target: HF model.generate'] / med['target: HF model.generate']):.2f}×"
            vs_hf = f"{rate / (tokens['target: engine=hf'] / med['target: engine=hf']):.2f}×"
        else:
            vs_gen, vs_hf = "-", f"{med['rsd δ=0.7: engine=hf'] / med[name]:.2f}× faster"
        print(f"| {name} | {med[name]:.2f} | {rate:,.0f} | {vs_gen} | {vs_hf} | {same(name)} |")
    if vl:
        eng, plain = "target: engine=vllm", "target: plain vllm.LLM.generate"
        print(f"\nengine=vllm target_only reaches {(tokens[eng] / med[eng]) / (tokens[plain] / med[plain]):.2f}× "
              "plain vllm.LLM.generate's output tok/s on the same prompts")


if __name__ == "__main__":
    main()
