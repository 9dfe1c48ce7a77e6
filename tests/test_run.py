"""shard -> run -> merge on real (tiny) models: records, ledger, resume, config refusal, coverage."""
from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from rsd_batch.files import read_arrow, read_json, write_arrow
from rsd_batch.merge import MergeError, merge_run
from rsd_batch.models import render_prompt
from rsd_batch.problems import load_problems
from rsd_batch.rundir import RunConfigMismatch, mark_done, result_paths
from rsd_batch.runner import run
from rsd_batch.shards import write_shards

from conftest import cli, make_config


def shard_and_run(args, *more):
    cfg = make_config(*args, *more)
    write_shards(cfg.dataset, Path(cfg.run.shards_from or cfg.run.dir))
    return cfg, run(cfg)


def outputs(run_dir) -> dict:
    t = datasets.load_dataset("parquet", data_files=str(Path(run_dir) / "merged/data.parquet"),
                              split="train")
    return {(r["id"], r["sample_index"]): r for r in t}


def test_end_to_end_records_and_ledger(tiny_run_args, tiny_models):
    from transformers import AutoTokenizer

    cfg, report = shard_and_run(tiny_run_args)
    assert report["ran"] == [0, 1, 2] and report["skipped"] == 0
    summary = merge_run(Path(cfg.run.dir))
    rows = outputs(cfg.run.dir)
    assert len(rows) == 24 == summary["samples"] == summary["problems"]
    tok = AutoTokenizer.from_pretrained(tiny_models["target"])
    cost = None
    for r in rows.values():
        assert r["finish_reason"] in ("eos", "max_tokens") and r["error"] is None
        t = r["ledger"]["target"]
        prompt = tok(render_prompt(tok, r["problem"], cfg.prompt), add_special_tokens=False)["input_ids"]
        assert t["prefill_tokens"] == len(prompt)
        assert 1 <= t["generated_tokens"] <= 12 and t["decode_tokens"] == t["generated_tokens"] - 1
        if r["finish_reason"] == "max_tokens":
            assert t["generated_tokens"] == 12
        assert t["flops"] == t["prefill_flops"] + t["decode_flops"] > 0 and t["seconds"] > 0
        assert r["ledger"]["draft"]["flops"] == 0 == r["ledger"]["prm"]["flops"]
        assert r["ledger"]["flops"] == t["flops"]
        assert r["answer"] is not None and r["correct"] in (True, False)
        assert "".join(s["text"] for s in r["steps"]) in (r["output"], r["output"].rstrip())
        assert all(s["source"] == "target" for s in r["steps"])
    # FLOPs agree with the cost formula for the actual token counts.
    from rsd_batch.ledger import CostModel
    from transformers import AutoConfig
    cost = CostModel.from_config(AutoConfig.from_pretrained(tiny_models["target"]))
    r = next(iter(rows.values()))
    t = r["ledger"]["target"]
    # The lm_head is charged where logits are computed: once for the prefill (its last token), once per decode.
    config = AutoConfig.from_pretrained(tiny_models["target"])
    assert cost.head_params == config.vocab_size * config.hidden_size
    n, body = t["prefill_tokens"], cost.non_embedding_params - cost.head_params
    assert t["prefill_flops"] == cost.forward_flops(n, 0, 1) == \
        2 * body * n + 2 * cost.head_params + 2 * cost.n_layers * cost.d_attn * n * (n + 1) // 2
    assert t["decode_flops"] == sum(cost.forward_flops(1, n + i, 1) for i in range(t["decode_tokens"]))
    role = summary["roles"]["target"]["total"]
    assert role["generated_tokens"] == sum(x["ledger"]["target"]["generated_tokens"] for x in rows.values())
    assert summary["finish_reasons"] and sum(summary["finish_reasons"].values()) == 24


def test_rerun_skips_done_shards(tiny_run_args):
    cfg, _ = shard_and_run(tiny_run_args)
    final, done, _ = result_paths(Path(cfg.run.dir), 0)
    before = (final.stat().st_mtime_ns, done.read_text())
    report = run(cfg)
    assert report["ran"] == [] and report["skipped"] == 3
    assert (final.stat().st_mtime_ns, done.read_text()) == before


def test_mixed_config_is_refused_unless_fresh(tiny_run_args):
    cfg, _ = shard_and_run(tiny_run_args)
    other = make_config(*tiny_run_args, "method.max_new_tokens=13")
    with pytest.raises(RunConfigMismatch, match=r"method.max_new_tokens: 12 -> 13.*run.fresh=true"):
        run(other)
    swapped = make_config(*tiny_run_args, f"model.target.path={cfg.model.draft.path}")
    with pytest.raises(RunConfigMismatch, match="models.target.content.files.model.safetensors"):
        run(swapped)
    # Batch size and progress do not change outputs: not a different config.
    assert run(make_config(*tiny_run_args, "run.batch_size=2"))["ran"] == []
    fresh = make_config(*tiny_run_args, "method.max_new_tokens=13", "run.fresh=true")
    assert run(fresh)["ran"] == [0, 1, 2]
    merge_run(Path(cfg.run.dir))
    assert max(r["ledger"]["target"]["generated_tokens"] for r in outputs(cfg.run.dir).values()) == 13


def test_outputs_do_not_depend_on_batch_or_shard_layout(tiny_run_args, tmp_path):
    """Sampling at T=1 with per-sample generators: same text alone, in a batch, in another shard."""
    sampled = [*tiny_run_args, "method.temperature=1.0", "method.n=2"]
    a, _ = shard_and_run(sampled, f"run.dir={tmp_path / 'a'}", "run.batch_size=1")
    b, _ = shard_and_run(sampled, f"run.dir={tmp_path / 'b'}", "run.batch_size=16",
                         "dataset.shard_size=5")
    merge_run(tmp_path / "a")
    merge_run(tmp_path / "b")
    ra, rb = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert len(ra) == 48 and ra.keys() == rb.keys()
    assert all(ra[k]["output"] == rb[k]["output"] for k in ra)
    # The two samples of a problem are different draws.
    assert sum(ra[(i, 0)]["output"] != ra[(i, 1)]["output"] for i, _ in ra if _ == 0) >= 20


def test_prompt_too_long_is_refused_before_loading_or_an_error_record(tiny_run_args):
    from rsd_batch.models import PromptTooLong
    with pytest.raises(PromptTooLong, match=r"24 of 24 problems have a prompt that does not fit the context of 20 "
                                            r"tokens .*run.long_prompts=error_record"):
        shard_and_run(tiny_run_args, "model.target.max_context=20")
    assert not (Path(make_config(*tiny_run_args).run.dir) / "run.json").exists()
    cfg, _ = shard_and_run(tiny_run_args, "model.target.max_context=20", "run.long_prompts=error_record")
    merge_run(Path(cfg.run.dir))
    rows = outputs(cfg.run.dir).values()
    assert all(r["finish_reason"] == "error" and "context is 20" in r["error"] for r in rows)
    assert all(r["correct"] is False for r in rows)


def test_merge_refuses_missing_shard_and_bad_coverage(tiny_run_args):
    cfg, _ = shard_and_run(tiny_run_args)
    run_dir = Path(cfg.run.dir)
    final1, done1, _ = result_paths(run_dir, 1)
    saved = final1.read_bytes(), done1.read_text()
    done1.unlink()
    final1.unlink()
    with pytest.raises(MergeError, match=r"1 of 3 shards are not done \(shards 1\).*rsd-batch run"):
        merge_run(run_dir)
    final1.write_bytes(saved[0])
    done1.write_text(saved[1])
    # A result file edited after its marker was written is not shipped: the marker's sha256 says so.
    final0, _, _ = result_paths(run_dir, 0)
    t0, t1 = read_arrow(final0), read_arrow(final1)
    edited = t1.set_column(t1.schema.get_field_index("output"), "output",
                           pa.array(["edited"] + t1["output"].to_pylist()[1:]))
    write_arrow(final1, edited.replace_schema_metadata(t1.schema.metadata))
    with pytest.raises(MergeError, match=r"sha256 does not match.*Delete .*shard-00001.arrow and .*done.json"):
        merge_run(run_dir)
    assert not (run_dir / "merged").exists() or not list((run_dir / "merged").iterdir())  # nothing shipped
    fp = read_json(done1)["fingerprint"]

    def rewrite(table):  # as if the run itself had written it: a marker that agrees
        write_arrow(final1, table.replace_schema_metadata(t1.schema.metadata))
        mark_done(final1, done1, final1.with_suffix(".parts"), fp)

    # A sample committed twice (shard 0's first row also in shard 1) must not merge.
    rewrite(pa.concat_tables([t1, t0.slice(0, 1)]))
    with pytest.raises(MergeError, match="1 duplicated samples"):
        merge_run(run_dir)
    rewrite(t1.slice(1))
    with pytest.raises(MergeError, match="1 missing samples"):
        merge_run(run_dir)
    # The right count with one sample swapped for another shard's: the fast in-order proof fails and the
    # full check names both.
    rewrite(pa.concat_tables([t1.slice(1), t0.slice(0, 1)]))
    with pytest.raises(MergeError, match="1 missing samples.*1 duplicated samples"):
        merge_run(run_dir)
    rewrite(t1)
    assert merge_run(run_dir)["samples"] == 24


def test_draft_only_uses_the_draft(tiny_run_args):
    cfg, _ = shard_and_run(tiny_run_args, "method=draft_only")
    merge_run(Path(cfg.run.dir))
    rows = outputs(cfg.run.dir).values()
    assert all(r["ledger"]["draft"]["generated_tokens"] > 0 and r["ledger"]["target"]["flops"] == 0
               for r in rows)
    assert all(s["source"] == "draft" for r in rows for s in r["steps"])


def test_shards_from_shares_one_sharding(tiny_run_args, tmp_path):
    base, _ = shard_and_run(tiny_run_args)
    cfg = make_config(*tiny_run_args, f"run.dir={tmp_path / 'other'}", f"run.shards_from={base.run.dir}")
    assert run(cfg)["ran"] == [0, 1, 2]
    assert merge_run(tmp_path / "other")["samples"] == 24
    shutil.rmtree(tmp_path / "other")


def test_local_run_sets_torch_threads(tiny_run_args):
    import os
    cli("shard", *tiny_run_args)
    one = cli("run", *tiny_run_args, "run.threads=1")
    assert "torch threads: 1 (run.threads)" in one.stdout + one.stderr
    cores = len(os.sched_getaffinity(0))
    again = cli("run", *tiny_run_args)  # default: the cores this process may use
    assert f"torch threads: {cores} (the cores this process may use)" in again.stdout + again.stderr


def test_samples_with_an_error_are_left_out_of_the_flops_saved(tiny_run_args, tiny_models):
    """Some prompts longer than the context: their error records cost nothing and claim no target-alone
    cost, the headline's FLOPs ratio is over the samples that ran, and the errors are counted beside it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["target"])
    cfg = make_config(*tiny_run_args)
    problems = load_problems(cfg.dataset).table["problem"].to_pylist()
    lengths = sorted(len(tok(render_prompt(tok, p, cfg.prompt), add_special_tokens=False)["input_ids"]) for p in problems)
    limit = lengths[len(lengths) // 2]  # about half the prompts do not fit
    cfg, _ = shard_and_run(tiny_run_args, "method=rsd", f"model.target.max_context={limit}", f"model.draft.max_context={limit}",
                           "run.long_prompts=error_record")
    summary = merge_run(Path(cfg.run.dir))
    rows = list(outputs(cfg.run.dir).values())
    errors = [r for r in rows if r["error"] is not None]
    ran = [r for r in rows if r["error"] is None]
    assert errors and ran and summary["errors"] == len(errors)
    assert all(r["ledger"]["flops"] == 0 == r["ledger"]["target_only_flops"] for r in errors)
    want = sum(r["ledger"]["target_only_flops"] for r in ran) / sum(r["ledger"]["flops"] for r in ran)
    assert abs(summary["flops_vs_target_only"] - want) < 1e-12
    from rsd_batch.merge import format_summary
    assert f"({len(errors)} samples with an error left out)" in format_summary({**summary, "method": "rsd"})


def test_the_fingerprint_holds_only_the_chosen_methods_knobs(tiny_run_args):
    """An rsd run resumes after a beam-search knob (or the target's rewrite scheduling) changed; one of
    its own knobs changing is still refused."""
    args = [*tiny_run_args, "method=rsd"]
    cfg = make_config(*args, "dataset.limit=8")
    write_shards(cfg.dataset, Path(cfg.run.dir))
    first = run(make_config(*args, "dataset.limit=8", "run.batch_size=1", "method.max_new_tokens=12"))
    assert first["complete"]
    again = run(make_config(*args, "dataset.limit=8", "method.beam_width=7", "method.candidates=9",
                            "method.speculative_tokens=2", "method.rewrite_share=1.0"))
    assert again["fingerprint"] == first["fingerprint"] and again["ran"] == []
    with pytest.raises(RunConfigMismatch, match=r"method.threshold: 0.7 -> 0.5"):
        run(make_config(*args, "dataset.limit=8", "method.threshold=0.5"))
