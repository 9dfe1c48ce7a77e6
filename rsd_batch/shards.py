"""Arrow shard files and the manifest that lists them.

    <run>/manifest.json          shard paths, row counts, sha256s, schema, source and config fingerprint
    <run>/shards/shard-00000.arrow
    <run>/quarantine.jsonl       bad rows, only with dataset.on_bad_row=skip

The same input and config give byte-identical shards and manifest (nothing time-dependent is written),
so re-sharding is a no-op and a fingerprint mismatch always means a real difference.

Sharding streams (rsd_batch.staging): pass one validates and stages the rows block by block, pass two
cuts them into the planned shards, hashing each from memory. Shards are renamed into place but not
fsynced one by one (on 1M rows that was most of the write time): the manifest, written last, is, and
every shard's sha256 is checked when it is read, so a machine crash right after sharding shows up as
a clear error that re-sharding fixes.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa

from .config import DatasetConfig, to_container
from .errors import UserError
from .files import CorruptFile, atomic_path, fingerprint, read_arrow, read_json, sha256_file, write_arrow, write_json
from .problems import open_problems
from .staging import Staged, stage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
LOOKAHEAD = 1024  # rows after a shard that its slice is cut from
STAGING = ".staging"  # pass one's blocks, removed once the shards are written
MANIFEST_VERSION = 1


class ShardError(UserError, RuntimeError):
    pass


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


MIN_SHARD_ROWS = 250  # below this a shard's work is mostly loading the models
MAX_SHARDS = 1000  # SLURM's default MaxArraySize is 1001: one array, indices 0..999


def default_shard_size(num_rows: int) -> int:
    return max(MIN_SHARD_ROWS, -(-num_rows // MAX_SHARDS))


def plan_shards(num_rows: int, cfg: DatasetConfig) -> list[tuple[int, int]]:
    """(offset, length) of each shard: contiguous slices in source order, sizes within one row."""
    size = cfg.shard_size or default_shard_size(num_rows)
    n = cfg.num_shards or max(1, -(-num_rows // size))
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


def write_shards(cfg: DatasetConfig, run_dir: Path, fresh: bool = False) -> dict:
    """Stream the problem set into shards and a manifest; a no-op when the folder already holds the
    same shards (recognised from the source's hash, before anything is parsed)."""
    run_dir = Path(run_dir)
    src = open_problems(cfg)
    fp = dataset_fingerprint(src.source, cfg)
    manifest_path = run_dir / MANIFEST
    if manifest_path.exists():
        try:
            old = read_json(manifest_path)
        except CorruptFile:
            old = {}  # written again below, like a damaged shard
        if old.get("fingerprint") == fp and _shards_intact(run_dir, old):
            log.info("%s already holds these shards (fingerprint %s); nothing to do", run_dir, fp)
            return old
        if old.get("fingerprint") == fp or not old:
            # Same problem set and config, a shard damaged or lost: the same bytes are written again and the
            # results (of these very shards) are kept.
            log.warning("%s: a shard or the manifest does not match; writing them again", run_dir)
            shutil.rmtree(run_dir / "shards", ignore_errors=True)
        elif not fresh:
            raise ShardError(
                f"{run_dir} already holds shards of another problem set or dataset config "
                f"(fingerprint {old.get('fingerprint')}, now {fp}). Choose another run.dir, or set "
                "run.fresh=true to delete its shards and results and start again.")
        else:
            clear_run(run_dir)
    created = not run_dir.exists()
    try:
        staged = stage(src, cfg, folder=run_dir / STAGING)
        shards, schema, with_answer = _write_planned(staged, cfg, run_dir)
    except BaseException:
        # A bad row stops the job before any shard: leave no folder behind that was not there before.
        shutil.rmtree(run_dir if created else run_dir / STAGING, ignore_errors=True)
        raise
    shutil.rmtree(run_dir / STAGING, ignore_errors=True)
    quarantine = None
    if staged.bad_rows:
        _write_quarantine(run_dir / QUARANTINE, staged)
        quarantine = {"path": QUARANTINE, "rows": len(staged.bad_rows)}
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": fp,
        "dataset": to_container(cfg),
        "source": staged.source,
        "num_rows": staged.num_rows,
        "num_with_answer": with_answer,
        "schema": schema,
        "shards": shards,
        "quarantine": quarantine,
    }
    write_json(manifest_path, manifest)
    return manifest


def _write_planned(staged: Staged, cfg: DatasetConfig, run_dir: Path) -> tuple[list[dict], str, int]:
    """Pass two: cut the staged rows into the planned shards as they stream by, hashing each shard
    from memory as it is written."""
    plan = plan_shards(staged.num_rows, cfg)
    shards: list[dict] = []
    pending: list[pa.Table] = []
    have = 0
    schema, with_answer = "", 0
    batches = staged.batches()
    for index, (_, length) in enumerate(plan):
        for t in batches:
            pending.append(t)
            have += len(t)
            if have >= length + LOOKAHEAD:
                break
        # The shard as a slice of a longer array, as when the whole set was one table: Arrow's writer
        # pads a sliced buffer with the bytes that follow it, so this keeps the bytes of every shard.
        window, _ = _split(pending, min(have, length + LOOKAHEAD))
        table = (pa.concat_tables(window) if len(window) > 1 else window[0]).combine_chunks().slice(0, length)
        _, pending = _split(pending, length)
        have -= length
        rel = f"shards/{shard_name(index)}.arrow"
        shards.append({"index": index, "path": rel, "rows": length,
                       "sha256": write_arrow(run_dir / rel, table, durable=False)})
        with_answer += length - table["answer"].null_count
        schema = schema or table.schema.to_string(show_schema_metadata=False)
    return shards, schema, with_answer


def _split(tables: list[pa.Table], n: int) -> tuple[list[pa.Table], list[pa.Table]]:
    head, rest, need = [], [], n
    for t in tables:
        if need >= len(t):
            head.append(t)
            need -= len(t)
        elif need > 0:
            head.append(t.slice(0, need))
            rest.append(t.slice(need))
            need = 0
        else:
            rest.append(t)
    return head, rest


def clear_run(run_dir: Path) -> None:
    """Remove what a run folder holds (shards, results, merged output), keeping nothing stale."""
    for name in ("shards", "results", "merged", STAGING):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (MANIFEST, QUARANTINE, "run.json", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)


def _write_quarantine(path: Path, staged: Staged) -> None:
    where = staged.source.get("path") or staged.source.get("name")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for b in staged.bad_rows:
            f.write(json.dumps({"source": b.file or where, staged.source.get("unit", "row"): b.row,
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
    try:
        manifest = read_json(path, ("version", "fingerprint", "shards", "num_rows"))
    except CorruptFile as e:
        raise ShardError(f"{path}: {e.why}. Run `rsd-batch shard` again with the same dataset config: it "
                         "writes the manifest and shards again and keeps the results.") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')} is not "
                         f"{MANIFEST_VERSION}; re-shard with this version of rsd_batch.")
    return manifest


def read_shard(run_dir: Path, manifest: dict, index: int, verify: bool = True) -> pa.Table:
    entry = manifest["shards"][index]
    path = Path(run_dir) / entry["path"]
    again = ("Run `rsd-batch shard` again with the same dataset config: it writes the same bytes again "
             "and keeps the results (or set run.fresh=true to start over).")
    try:
        return read_arrow(path, rows=entry["rows"], sha256=entry["sha256"] if verify else None)
    except FileNotFoundError:
        raise ShardError(f"{path} is missing. {again}") from None
    except CorruptFile as e:
        raise ShardError(f"{path}: {e.why}; the shard was changed after sharding. {again}") from None
