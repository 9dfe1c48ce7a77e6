"""Merging a run: prove coverage against the manifest, write one dataset, summarise the ledger.

    <run>/merged/data.parquet    every sample exactly once (datasets.load_dataset("parquet", ...))
    <run>/summary.json           counts, finish reasons, accuracy, ledger totals and means per role

Re-runs nothing: a shard without its DONE marker makes the merge fail and say which.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .files import CorruptFile, atomic_path, read_arrow, read_json, sha256_file, write_json
from .ledger import ROLES
from .rundir import DONE_KEYS, RUN_FILE, SUMMARY_FILE, merged_path, result_paths, shard_covered
from .shards import read_manifest, read_shard

log = logging.getLogger(__name__)

def current_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary if its merge is of the run's current config and the dataset is there, else None."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY_FILE
    if not (path.exists() and merged_path(run_dir).exists() and (run_dir / RUN_FILE).exists()):
        return None
    summary = read_json(path)
    return summary if summary.get("fingerprint") == read_json(run_dir / RUN_FILE)["fingerprint"] else None


def merged_summary(run_dir: Path) -> dict:
    """The current summary, merging first when there is none (MergeError if shards are not done)."""
    return current_summary(run_dir) or merge_run(run_dir)


class MergeError(UserError, RuntimeError):
    pass


def _keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table["id"], pc.cast(table["sample_index"], pa.string()), "\x1f")


def _examples(arr: pa.Array, k: int = 5) -> str:
    return ", ".join(repr(v.replace("\x1f", "#")) for v in arr.slice(0, k).to_pylist())


def merge_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise MergeError(f"{run_dir} has no {RUN_FILE}: nothing was run there yet "
                         f"(rsd-batch run run.dir={run_dir}).")
    run_info = read_json(run_dir / RUN_FILE)
    fp, shards_root = run_info["fingerprint"], Path(run_info["shards_dir"])
    n = run_info["identity"]["method"]["n"]
    manifest = read_manifest(shards_root)
    pool = ThreadPoolExecutor(1)  # hashlib lets go of the GIL: results hash while the dataset is written
    try:
        tables, hashing = _finished_results(run_dir, manifest, fp, pool)
        merged = pa.concat_tables(tables, promote_options="default")
        if not _covers_in_order(tables, shards_root, manifest, n):
            _check_coverage(merged, shards_root, manifest, n)  # says what is missing or repeated
        out = merged_path(run_dir)
        with atomic_path(out, needed=merged.nbytes // 3) as tmp:  # zstd Parquet: about a third of Arrow
            pq.write_table(merged, tmp, compression="zstd")
            # What merge ships is what the run wrote: every result's sha256 is its marker's, or nothing
            # is renamed into place.
            for final, want, digest, redo in hashing:
                if digest.result() != want:
                    raise MergeError(f"{final}: its sha256 does not match the one recorded when it was "
                                     f"written. {redo}")
    finally:
        pool.shutdown(cancel_futures=True)  # a refusal does not wait for hashes nobody will read
    summary = summarize(merged)
    summary.update({"run_dir": str(run_dir), "fingerprint": fp, "dataset": str(out),
                    "method": run_info["identity"]["method"]["name"],
                    "quarantined_rows": (manifest.get("quarantine") or {}).get("rows", 0)})
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _finished_results(run_dir: Path, manifest: dict, fp: str, pool: ThreadPoolExecutor) -> tuple[list, list]:
    """Every shard's finished results (their rows checked against the marker now, their sha256 on `pool`);
    MergeError naming what is not done or not right, and how to fix it."""
    missing_shards, tables, hashing = [], [], []
    for entry in manifest["shards"]:
        final, done, parts = result_paths(run_dir, entry["index"])
        if not done.exists():
            missing_shards.append(entry["index"])
            continue
        redo = (f"Delete {final} and {done}, run `rsd-batch run run.dir={run_dir}` (it redoes that shard), "
                "then merge again.")
        try:
            marker = read_json(done, DONE_KEYS)
            if marker["fingerprint"] != fp:
                raise MergeError(f"{done}: written under config {marker['fingerprint']}, the run is {fp}. {redo}")
            tables.append(read_arrow(final, rows=marker["rows"]))
            hashing.append((final, marker["sha256"], pool.submit(sha256_file, final), redo))
        except CorruptFile as e:
            raise MergeError(f"{e.path}: {e.why}. {redo}") from None
        except FileNotFoundError:
            raise MergeError(f"{final} is missing though {done} says the shard is done. {redo}") from None
    if missing_shards:
        shown = ", ".join(str(i) for i in missing_shards[:20])
        raise MergeError(
            f"{run_dir}: {len(missing_shards)} of {len(manifest['shards'])} shards are not done "
            f"(shards {shown}{' ...' if len(missing_shards) > 20 else ''}). Finish them with "
            f"`rsd-batch run run.dir={run_dir}` (it resumes), then merge again.")
    return tables, hashing


def _covers_in_order(tables: list[pa.Table], shards_root: Path, manifest: dict, n: int) -> bool:
    """The fast proof: each finished shard holds exactly its shard's ids, each n times, in shard order
    (as the runner writes it). Shards share no id (sharding refuses duplicates), so this is coverage."""
    return all(shard_covered(table, read_shard(shards_root, manifest, e["index"], verify=False)["id"]
                             .combine_chunks(), n) is None
               for e, table in zip(manifest["shards"], tables))


def _check_coverage(merged: pa.Table, shards_root: Path, manifest: dict, n: int) -> None:
    expected_ids = pa.concat_arrays([read_shard(shards_root, manifest, e["index"], verify=False)["id"]
                                     .combine_chunks() for e in manifest["shards"]])
    expected = pa.concat_arrays([
        pc.binary_join_element_wise(expected_ids, pa.array([str(k)] * len(expected_ids)), "\x1f")
        for k in range(n)])
    got = _keys(merged).combine_chunks() if isinstance(_keys(merged), pa.ChunkedArray) else _keys(merged)
    counts = pc.value_counts(got)
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    unknown = got.filter(pc.invert(pc.is_in(got, value_set=expected)))
    missing = expected.filter(pc.invert(pc.is_in(expected, value_set=got)))
    problems = []
    if len(missing):
        problems.append(f"{len(missing)} missing samples (e.g. {_examples(missing)})")
    if len(dups):
        problems.append(f"{len(dups)} duplicated samples (e.g. {_examples(dups)})")
    if len(unknown):
        problems.append(f"{len(unknown)} samples not in the manifest (e.g. {_examples(unknown)})")
    if problems:
        raise MergeError("coverage check failed: " + "; ".join(problems)
                         + ". The results do not match the shards; re-run the affected shards "
                         "(delete their results/shard-*.done.json) or start with run.fresh=true.")


def summarize(table: pa.Table) -> dict:
    # Column by column over the chunks as they are: combining 1M rows of nested columns first cost
    # more than the whole Parquet write.
    reasons = pc.value_counts(table["finish_reason"])
    graded = table["correct"].drop_null()
    # The ledger's leaves as plain columns ("ledger.draft.flops"), flattened once: a struct_field per
    # leaf over a thousand chunks cost 6x more.
    ledger = table.select(["ledger"]).flatten().flatten()
    n = table.num_rows

    def field(*names):  # noqa: ANN001
        return ledger[".".join(("ledger",) + names)]
    per_role = {}
    for role in ROLES:
        tot = {k: pc.sum(field(role, k)).as_py() or 0 for k in
               ("prefill_tokens", "decode_tokens", "generated_tokens", "discarded_tokens", "flops",
                "seconds")}
        per_role[role] = {"total": tot, "mean": {k: v / n for k, v in tot.items()}}
    steps = pc.list_flatten(table["steps"])
    decided = pc.struct_field(steps, ["accepted"]).drop_null() if len(steps) else pa.array([], pa.bool_())
    draft_gen = per_role["draft"]["total"]["generated_tokens"]
    # The FLOPs-saved headline counts the samples that ran: one that ended in an error (a prompt longer
    # than the context) decoded nothing, and is counted apart.
    ok = pc.is_null(table["error"])
    target_only = pc.sum(field("target_only_flops").filter(ok)).as_py() or 0
    total_flops = pc.sum(field("flops").filter(ok)).as_py() or 0
    errors = n - (pc.sum(ok).as_py() or 0)
    return {
        "samples": n,
        "steps": len(steps),
        # RSD: draft steps kept among those the PRM judged; tokens: kept draft tokens among drafted.
        "acceptance": {
            "steps": (pc.sum(decided).as_py() or 0) / len(decided) if len(decided) else None,
            "draft_tokens": 1 - per_role["draft"]["total"]["discarded_tokens"] / draft_gen if draft_gen else None,
        },
        # What the target alone would have spent on the same prompts and output lengths.
        "flops_vs_target_only": target_only / total_flops if target_only and total_flops else None,
        "errors": errors,
        "problems": len(pc.unique(table["id"])),
        "finish_reasons": {r["values"]: r["counts"] for r in reasons.to_pylist()},
        "graded": len(graded),
        "correct": int(pc.sum(graded).as_py() or 0),
        "accuracy": (pc.sum(graded).as_py() or 0) / len(graded) if len(graded) else None,
        "flops": {"total": pc.sum(field("flops")).as_py() or 0,
                  "mean": (pc.sum(field("flops")).as_py() or 0) / n},
        "latency_seconds_mean": pc.mean(field("latency_seconds")).as_py(),
        "roles": per_role,
    }


def format_summary(summary: dict) -> str:
    """The printed table: a few lines a person reads after a run."""
    from rich.console import Console
    from rich.table import Table

    acc = summary["accuracy"]
    head = (f"{summary['samples']} samples of {summary['problems']} problems · method "
            f"{summary['method']} · accuracy "
            + (f"{acc:.1%} ({summary['correct']}/{summary['graded']} graded)" if acc is not None
               else "n/a (no gold answers)")
            + " · finish: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["finish_reasons"].items())))
    acc_s = summary.get("acceptance", {}).get("steps")
    if acc_s is not None:
        head += (f" · draft steps accepted {acc_s:.1%}"
                 + (f" · {summary['flops_vs_target_only']:.2f}× fewer FLOPs than target alone"
                    if summary.get("flops_vs_target_only") else "")
                 + (f" ({summary['errors']} samples with an error left out)" if summary.get("errors") else ""))
    t = Table()
    for col in ("role", "prefill tok", "decode tok", "generated tok", "FLOPs", "seconds",
                "gen tok/sample", "FLOPs/sample", "s/sample"):
        t.add_column(col, justify="right" if col != "role" else "left")
    for role, d in summary["roles"].items():
        tot, mean = d["total"], d["mean"]
        if not any(tot.values()):
            continue
        t.add_row(role, f"{tot['prefill_tokens']:,}", f"{tot['decode_tokens']:,}",
                  f"{tot['generated_tokens']:,}", f"{tot['flops']:.3e}", f"{tot['seconds']:.1f}",
                  f"{mean['generated_tokens']:.1f}", f"{mean['flops']:.3e}", f"{mean['seconds']:.3f}")
    console = Console(width=140, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(t)
    return head + "\n" + cap.get()
