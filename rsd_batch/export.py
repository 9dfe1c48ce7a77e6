"""Training data from a merged run: a Hugging Face dataset folder (Parquet) in one of two layouts.

    rsd-batch export runs/math500-rsd layout=sft correct_only=true finish_reasons=[eos]

    <out>/data/<split>-00000-of-00001.parquet   datasets.load_dataset(<out>) reads it
    <out>/export.json                           the source run, the filters, rows kept per filter

Layouts:
  sft  id, messages [{role, content}] (the run's own system prompt and template, then the output)
  prm  TRL's step-wise supervision layout: prompt, completions (the kept steps), labels (reward >=
       label_threshold; null for steps the PRM never scored, e.g. the target's rewrites), plus the
       rewards, the source model of each step, and each rejected draft step with its reward
       (a scored negative for the step it lost to).
Both carry the grading (answer, extracted_answer, correct), finish_reason, draft_share and min_reward.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from .config import ExportConfig, ExportLayout, to_container
from .errors import UserError
from .files import atomic_path, read_json, write_json
from .merge import current_summary
from .rundir import merged_path
from .models import prompt_messages
from .rundir import RUN_FILE


class ExportError(UserError, RuntimeError):
    pass


def _step_stats(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Per sample: the share of its kept steps the draft wrote, and its lowest PRM reward (null if
    no kept step was scored)."""
    steps = table["steps"].combine_chunks()
    flat = pc.list_flatten(steps)
    parent = pc.list_parent_indices(steps)
    per = pa.table({"row": parent, "draft": pc.cast(pc.equal(flat.field("source"), "draft"), pa.int64()),
                    "reward": flat.field("reward")})
    agg = per.group_by("row").aggregate([("draft", "mean"), ("reward", "min")])
    n = table.num_rows
    share = [0.0] * n
    low: list = [None] * n
    for r, d, m in zip(agg["row"].to_pylist(), agg["draft_mean"].to_pylist(), agg["reward_min"].to_pylist()):
        share[r], low[r] = d, m
    return pa.array(share, pa.float64()), pa.array(low, pa.float64())


def _filters(cfg: ExportConfig, table: pa.Table, share: pa.Array, low: pa.Array) -> list[tuple[str, pa.Array]]:
    """(name, keep mask) in the order they apply; a sample with an error is never training data."""
    out = [("no error", pc.is_null(table["error"]))]
    if cfg.correct_only:
        out.append(("correct", pc.fill_null(table["correct"], False)))
    if cfg.finish_reasons is not None:
        out.append((f"finish_reason in {list(cfg.finish_reasons)}",
                    pc.is_in(table["finish_reason"], value_set=pa.array(list(cfg.finish_reasons), pa.string()))))
    if cfg.min_step_reward is not None:
        # A sample none of whose kept steps was scored cannot show it meets the bar: dropped.
        out.append((f"min step reward >= {cfg.min_step_reward}",
                    pc.fill_null(pc.greater_equal(low, cfg.min_step_reward), False)))
    if cfg.min_draft_share is not None:
        out.append((f"draft share >= {cfg.min_draft_share}", pc.greater_equal(share, cfg.min_draft_share)))
    if cfg.max_draft_share is not None:
        out.append((f"draft share <= {cfg.max_draft_share}", pc.less_equal(share, cfg.max_draft_share)))
    return out


def _sft(table: pa.Table, prompt) -> pa.Table:
    messages = [prompt_messages(problem, prompt) + [{"role": "assistant", "content": output}]
                for problem, output in zip(table["problem"].to_pylist(), table["output"].to_pylist())]
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table({"id": table["id"], "sample_index": table["sample_index"],
                     "messages": pa.array(messages, msg_type)})


def _prm(table: pa.Table, prompt, threshold: float) -> pa.Table:
    rows = {"prompt": [], "completions": [], "labels": [], "rewards": [], "sources": [],
            "rejected": []}
    for problem, steps in zip(table["problem"].to_pylist(), table["steps"].to_pylist()):
        rows["prompt"].append("\n\n".join(m["content"] for m in prompt_messages(problem, prompt)))
        rows["completions"].append([s["text"] for s in steps])
        rows["rewards"].append([s["reward"] for s in steps])
        rows["labels"].append([None if s["reward"] is None else s["reward"] >= threshold for s in steps])
        rows["sources"].append([s["source"] for s in steps])
        rows["rejected"].append([{"step": i, "text": s["rejected_text"], "reward": s["rejected_reward"]}
                                 for i, s in enumerate(steps) if s["rejected_text"] is not None])
    rejected_type = pa.list_(pa.struct([("step", pa.int32()), ("text", pa.string()), ("reward", pa.float64())]))
    return pa.table({
        "id": table["id"], "sample_index": table["sample_index"],
        "prompt": pa.array(rows["prompt"], pa.string()),
        "completions": pa.array(rows["completions"], pa.list_(pa.string())),
        "labels": pa.array(rows["labels"], pa.list_(pa.bool_())),
        "rewards": pa.array(rows["rewards"], pa.list_(pa.float64())),
        "sources": pa.array(rows["sources"], pa.list_(pa.string())),
        "rejected": pa.array(rows["rejected"], rejected_type),
    })


def export_run(cfg: ExportConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise ExportError(f"{run_dir} is not a run folder (no {RUN_FILE}); give the folder a run wrote.")
    info = read_json(run_dir / RUN_FILE)
    if current_summary(run_dir) is None:
        raise ExportError(f"{run_dir} has no merged dataset of its current config; merge it first: "
                          f"`rsd-batch merge run.dir={run_dir}`.")
    out = Path(cfg.out) if cfg.out else run_dir / "export" / str(cfg.layout)
    if (out / "export.json").exists():  # written last: an export that finished
        if not cfg.fresh:
            raise ExportError(f"{out} already holds an export; choose another out=, or set fresh=true "
                              "to replace it.")
        shutil.rmtree(out)
    elif out.exists() and (out / "data").exists():
        shutil.rmtree(out / "data")  # an export that stopped (a full disk): done again
    table = pq.read_table(merged_path(run_dir))
    share, low = _step_stats(table)
    counts, keep = [("merged samples", table.num_rows)], pa.array([True] * table.num_rows)
    for name, mask in _filters(cfg, table, share, low):
        keep = pc.and_(keep, mask)
        counts.append((name, int(pc.sum(keep).as_py() or 0)))
    kept, share, low = table.filter(keep), share.filter(keep), low.filter(keep)
    prompt = OmegaConf.create(info["config"]["prompt"])
    body = _sft(kept, prompt) if cfg.layout == ExportLayout.sft else _prm(kept, prompt, cfg.label_threshold)
    for name in ("answer", "extracted_answer", "correct", "finish_reason"):
        body = body.append_column(name, kept[name])
    body = body.append_column("draft_share", share).append_column("min_reward", low)
    path = out / "data" / f"{cfg.split}-00000-of-00001.parquet"
    with atomic_path(path, needed=body.nbytes // 3) as tmp:
        pq.write_table(body, tmp, compression="zstd")
    report = {"source_run": str(run_dir), "source_fingerprint": info["fingerprint"],
              "method": info["identity"]["method"]["name"], "config": to_container(cfg),
              "rows": body.num_rows, "kept_after_each_filter": dict(counts), "path": str(path)}
    write_json(out / "export.json", report)
    return report
