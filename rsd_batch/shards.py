"""Arrow shard files and the manifest that lists them.

    <run>/manifest.json          shard paths, row counts, sha256s, schema, source and config fingerprint
    <run>/shards/shard-00000.arrow
    <run>/quarantine.jsonl       bad rows, only with dataset.on_bad_row=skip

The same input and config give byte-identical shards and manifest (nothing time-dependent is written),
so re-sharding is a no-op and a fingerprint mismatch always means a real difference.

Sharding streams (rsd_batch.staging): pass one validates and stages the rows block by block, pass two
cuts them into the planned shards, hashing each from memory; when the row count is known before
parsing, pass one feeds the cutter itself. Shards are written under `.staging/` and the folder is
renamed into place once all are written. Shards are not
fsynced one by one (on 1M rows that was most of the write time): the manifest, written last, is, and
every shard's sha256 is checked when it is read, so a machine crash right after sharding shows up as
a clear error that re-sharding fixes.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from .config import DatasetConfig, to_container
from .errors import UserError
from . import rundir
from .files import CorruptFile, atomic_path, fingerprint, read_arrow, read_json, sha256_file, write_arrow, write_json
from .problems import open_problems
from .rundir import MANIFEST, QUARANTINE, SHARDS, STAGING, shard_name
from .staging import Staged, stage

log = logging.getLogger(__name__)
LOOKAHEAD = 1024  # rows after a shard that its slice is cut from
MANIFEST_VERSION = 1


class ShardError(UserError, RuntimeError):
    pass


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
    done = _already_there(run_dir, fp, fresh)
    if done is not None:
        return done
    created = not run_dir.exists()
    try:
        staged, writer = _cut(src, cfg, run_dir / STAGING)
        shutil.rmtree(run_dir / SHARDS, ignore_errors=True)
        writer.folder.rename(run_dir / SHARDS)
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
        "num_with_answer": writer.with_answer,
        "schema": writer.schema,
        "shards": writer.shards,
        "quarantine": quarantine,
    }
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def _already_there(run_dir: Path, fp: str, fresh: bool) -> Optional[dict]:
    """The manifest when the folder holds these very shards; else clear what must be written again
    (or refuse another problem set's folder)."""
    if not (run_dir / MANIFEST).exists():
        return None
    try:
        old = read_json(run_dir / MANIFEST)
    except CorruptFile:
        old = {}  # written again, like a damaged shard
    if old.get("fingerprint") == fp and _shards_intact(run_dir, old):
        log.info("%s already holds these shards (fingerprint %s); nothing to do", run_dir, fp)
        return old
    if old.get("fingerprint") == fp or not old:
        # Same problem set and config, a shard damaged or lost: the same bytes are written again and the
        # results (of these very shards) are kept.
        log.warning("%s: a shard or the manifest does not match; writing them again", run_dir)
        shutil.rmtree(run_dir / SHARDS, ignore_errors=True)
    elif not fresh:
        raise ShardError(
            f"{run_dir} already holds shards of another problem set or dataset config "
            f"(fingerprint {old.get('fingerprint')}, now {fp}). Choose another run.dir, or set "
            "run.fresh=true to delete its shards and results and start again.")
    else:
        rundir.clear(run_dir)
    return None


def _cut(src, cfg: DatasetConfig, staging: Path) -> tuple[Staged, "ShardWriter"]:  # noqa: ANN001
    """Both passes: the shards end up in `writer.folder` (under `staging`)."""
    writer = None

    def direct(rows: int) -> ShardWriter:
        nonlocal writer
        writer = ShardWriter(plan_shards(rows, cfg), staging / "direct")
        return writer
    staged = stage(src, cfg, folder=staging, cut=direct)
    if not staged.cut:
        writer = ShardWriter(plan_shards(staged.num_rows, cfg), staging / SHARDS)
        for table in staged.batches():
            writer.feed(table)
        writer.finish()
    return staged, writer


class ShardWriter:
    """Pass two: cuts rows arriving in source order into the planned shards, writing each (and its
    sha256, from memory) as soon as its rows and LOOKAHEAD rows after them are in."""

    def __init__(self, plan: list[tuple[int, int]], folder: Path) -> None:
        self.plan, self.folder = plan, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: list[pa.Table] = []
        self.have = 0
        self.shards: list[dict] = []
        self.schema, self.with_answer = "", 0

    def feed(self, table: pa.Table) -> None:
        if "_seq" in table.column_names:
            table = table.drop_columns(["_seq"])
        self.pending.append(table)
        self.have += len(table)
        while len(self.shards) < len(self.plan) and self.have >= self.plan[len(self.shards)][1] + LOOKAHEAD:
            self._write_next()

    def finish(self) -> None:
        while len(self.shards) < len(self.plan):
            self._write_next()

    def abandon(self) -> tuple[list[tuple[Path, int, int]], list[pa.Table]]:
        written = [(self.folder / Path(s["path"]).name, offset, s["rows"])
                   for s, (offset, _) in zip(self.shards, self.plan)]
        first = sum(rows for _, _, rows in written)
        held = []
        for t in self.pending:  # back with their sequence numbers (rows are consecutive here)
            held.append(t.append_column("_seq", pa.array(np.arange(first, first + len(t), dtype=np.int64))))
            first += len(t)
        self.pending, self.have = [], 0
        return written, held

    def _write_next(self) -> None:
        index = len(self.shards)
        length = self.plan[index][1]
        if self.have < length:
            raise RuntimeError(f"shard {index}: {self.have} rows left for a planned {length}")
        # The shard as a slice of a longer array, as when the whole set was one table: Arrow's writer
        # pads a sliced buffer with the bytes that follow it, so this keeps the bytes of every shard.
        window, _ = _split(self.pending, min(self.have, length + LOOKAHEAD))
        table = (pa.concat_tables(window) if len(window) > 1 else window[0]).combine_chunks().slice(0, length)
        _, self.pending = _split(self.pending, length)
        self.have -= length
        name = f"{shard_name(index)}.arrow"
        self.shards.append({"index": index, "path": f"{SHARDS}/{name}", "rows": length,
                            "sha256": write_arrow(self.folder / name, table, durable=False)})
        self.with_answer += length - table["answer"].null_count
        self.schema = self.schema or table.schema.to_string(show_schema_metadata=False)


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
