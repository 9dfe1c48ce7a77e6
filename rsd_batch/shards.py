"""Arrow shard files and the manifest that lists them.

    <run>/manifest.json          shard paths, row counts, sha256s, schema, source and config fingerprint
    <run>/shards/shard-00000.arrow
    <run>/quarantine.jsonl       bad rows, only with dataset.on_bad_row=skip

The same input and config give byte-identical shards and manifest (nothing time-dependent is written),
so re-sharding is a no-op and a fingerprint mismatch always means a real difference.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa

from .config import DatasetConfig, to_container
from .errors import UserError
from .files import atomic_path, fingerprint, read_arrow, read_json, sha256_file, write_arrow, write_json
from .problems import ProblemSet

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
MANIFEST_VERSION = 1


class ShardError(UserError, RuntimeError):
    pass


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def plan_shards(num_rows: int, cfg: DatasetConfig) -> list[tuple[int, int]]:
    """(offset, length) of each shard: contiguous slices in source order, sizes within one row."""
    n = cfg.num_shards or max(1, -(-num_rows // cfg.shard_size))
    n = max(1, min(n, num_rows))
    base, extra = divmod(num_rows, n)
    bounds, offset = [], 0
    for i in range(n):
        length = base + (i < extra)
        bounds.append((offset, length))
        offset += length
    return bounds


def dataset_fingerprint(source: dict, cfg: DatasetConfig) -> str:
    identity = {k: v for k, v in source.items() if k in ("sha256", "fingerprint", "format", "split", "name")}
    settings = to_container(cfg)
    settings.pop("name", None)  # a label, not an input
    settings.pop("source", None)  # the bytes (sha256) count, not where they lie
    return fingerprint({"source": identity, "dataset": settings})


def write_shards(problems: ProblemSet, cfg: DatasetConfig, run_dir: Path, fresh: bool = False) -> dict:
    """Write the shards and manifest; a no-op when the folder already holds the same shards."""
    run_dir = Path(run_dir)
    fp = dataset_fingerprint(problems.source, cfg)
    manifest_path = run_dir / MANIFEST
    if manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("fingerprint") == fp and _shards_intact(run_dir, old):
            log.info("%s already holds these shards (fingerprint %s); nothing to do", run_dir, fp)
            return old
        if not fresh:
            raise ShardError(
                f"{run_dir} already holds shards of another problem set or dataset config "
                f"(fingerprint {old.get('fingerprint')}, now {fp}). Choose another run.dir, or set "
                "run.fresh=true to delete its shards and results and start again.")
        clear_run(run_dir)
    table = problems.table
    shards = []
    for index, (offset, length) in enumerate(plan_shards(len(table), cfg)):
        rel = f"shards/{shard_name(index)}.arrow"
        write_arrow(run_dir / rel, table.slice(offset, length))
        shards.append({"index": index, "path": rel, "rows": length,
                       "sha256": sha256_file(run_dir / rel)})
    quarantine = None
    if problems.bad_rows:
        _write_quarantine(run_dir / QUARANTINE, problems)
        quarantine = {"path": QUARANTINE, "rows": len(problems.bad_rows)}
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "dataset": to_container(cfg),
        "source": problems.source,
        "num_rows": len(table),
        "num_with_answer": len(table) - table["answer"].null_count,
        "schema": table.schema.to_string(show_schema_metadata=False),
        "shards": shards,
        "quarantine": quarantine,
    }
    write_json(manifest_path, manifest)
    return manifest


def clear_run(run_dir: Path) -> None:
    """Remove what a run folder holds (shards, results, merged output), keeping nothing stale."""
    for name in ("shards", "results", "merged"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (MANIFEST, QUARANTINE, "run.json", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)


def _write_quarantine(path: Path, problems: ProblemSet) -> None:
    where = problems.source.get("path") or problems.source.get("name")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for b in problems.bad_rows:
            f.write(json.dumps({"source": where, problems.source.get("unit", "row"): b.row,
                                "field": b.field, "reason": b.reason, "raw": b.raw},
                               ensure_ascii=False, default=str) + "\n")


def _shards_intact(run_dir: Path, manifest: dict) -> bool:
    return all((run_dir / s["path"]).exists() and sha256_file(run_dir / s["path"]) == s["sha256"]
               for s in manifest["shards"])


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} does not exist: shard the problem set first "
                         f"(rsd-batch shard run.dir={run_dir} dataset=...).")
    manifest = read_json(path)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')} is not "
                         f"{MANIFEST_VERSION}; re-shard with this version of rsd_batch.")
    return manifest


def read_shard(run_dir: Path, manifest: dict, index: int, verify: bool = True) -> pa.Table:
    entry = manifest["shards"][index]
    path = Path(run_dir) / entry["path"]
    if verify and sha256_file(path) != entry["sha256"]:
        raise ShardError(f"{path}: its sha256 does not match the manifest; the shard was changed "
                         "after sharding. Re-shard with run.fresh=true.")
    return read_arrow(path)
