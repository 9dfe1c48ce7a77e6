"""The run folder: every file and folder a run keeps, and the questions every room asks of them.

    <run>/manifest.json, shards/          the problem set, cut (rsd_batch.shards writes them)
    <run>/quarantine.jsonl                bad rows, with dataset.on_bad_row=skip
    <run>/run.json                        the run's fingerprint and the resolved config behind it
    <run>/results/shard-00000.parts/part-00000-n8.arrow   committed batches of a shard in progress
    <run>/results/shard-00000.arrow       the finished shard (rows in shard order)
    <run>/results/shard-00000.done.json   written last: fingerprint, rows, sha256
    <run>/locks/shard-00000.lock          one writer per shard, in any launcher
    <run>/corrupt/                        files that failed a check, set aside (never deleted)
    <run>/merged/data.parquet, summary.json   the merged dataset and its summary
    <run>/launcher.json, slurm/           where a scheduler launcher keeps its submissions
    <run>/.staging/                       sharding's scratch, gone once the shards are written

Here too: how `run.dir` is resolved, `clear()`, whether a shard is done and how far the others got,
and the refusal to mix two configurations' results in one folder. Knows nothing of models or
schedulers; every other room asks this one instead of spelling a name out.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

from .errors import UserError
from .files import CorruptFile, fingerprint, read_arrow, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
QUARANTINE = "quarantine.jsonl"
STAGING = ".staging"
RUN_FILE = "run.json"
RESULTS = "results"
LOCKS = "locks"
CORRUPT = "corrupt"
MERGED = "merged"
SUMMARY_FILE = "summary.json"
POINTER_FILE = "launcher.json"  # where the run's scheduler folder is, when it is not <run>/slurm
SCHEDULER_FOLDER = "slurm"
DONE_KEYS = ("fingerprint", "rows", "sha256")


class RunConfigMismatch(UserError, RuntimeError):
    pass


def run_dir(cfg) -> Path:  # noqa: ANN001 - a Config or its DictConfig
    """`run.dir`, absolute: a SLURM task starts elsewhere, and every room must name the same folder."""
    return Path(cfg.run.dir).expanduser().resolve()


def shards_dir(cfg) -> Path:  # noqa: ANN001
    """Where the shards are read from: `run.shards_from` (another run's), else the run folder."""
    return Path(cfg.run.shards_from or cfg.run.dir).expanduser().resolve()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def merged_path(run: Path) -> Path:
    return Path(run) / MERGED / "data.parquet"


def clear(run: Path) -> None:
    """Remove what a run folder holds (shards, results, merged output), keeping nothing stale."""
    for name in (SHARDS, RESULTS, MERGED, STAGING):
        shutil.rmtree(run / name, ignore_errors=True)
    for name in (MANIFEST, QUARANTINE, RUN_FILE, SUMMARY_FILE):
        (run / name).unlink(missing_ok=True)


def move_to_corrupt(run: Path, path: Path, why: str) -> Path:
    """Set a damaged file aside in <run>/corrupt/ (never deleted: the operator may want to look)."""
    dest_dir = Path(run) / CORRUPT
    dest_dir.mkdir(parents=True, exist_ok=True)
    rel = Path(path).resolve().relative_to(Path(run).resolve()) if Path(path).resolve().is_relative_to(
        Path(run).resolve()) else Path(Path(path).name)
    dest = dest_dir / "__".join(rel.parts)
    k = 1
    while dest.exists():
        k += 1
        dest = dest_dir / f"{'__'.join(rel.parts)}.{k}"
    os.replace(path, dest)
    log.warning("%s: %s; set aside as %s (what it held is redone)", path, why, dest)
    return dest


# ---------------------------------------------------------------- one configuration per folder


def claim(run: Path, cfg, identity: dict) -> tuple[str, bool]:  # noqa: ANN001
    """This run's fingerprint, refusing a folder that holds another config's results (unless
    run.fresh, which deletes them). Returns (fingerprint, whether run.json must be written):
    `record` writes it once the models have loaded, so a run that cannot load never claims it."""
    fp = fingerprint(identity)
    path = run / RUN_FILE
    old = _recorded(run)
    if old is None:
        return fp, True
    if old["fingerprint"] != fp:
        if not cfg.run.fresh:
            raise _mismatch(run, old, identity, fp, "reusing them would mix two configs")
        log.warning("run.fresh=true: deleting the results of config %s in %s", old["fingerprint"], run)
        shutil.rmtree(run / RESULTS, ignore_errors=True)
        shutil.rmtree(run / MERGED, ignore_errors=True)
        path.unlink()
        return fp, True
    return fp, old.get("shards_dir") != str(shards_dir(cfg))


def check(run: Path, cfg, identity: dict) -> tuple[str, bool]:  # noqa: ANN001
    """What `claim` would say, changing nothing: (fingerprint, whether run.fresh would start over)."""
    fp = fingerprint(identity)
    old = _recorded(run)
    if old is None or old["fingerprint"] == fp:
        return fp, False
    if not cfg.run.fresh:
        raise _mismatch(run, old, identity, fp, "`rsd-batch run` would refuse to mix two configs")
    return fp, True


def record(run: Path, cfg, identity: dict, fp: str) -> None:  # noqa: ANN001
    from .config import to_container

    write_json(run / RUN_FILE, {"fingerprint": fp, "identity": identity, "shards_dir": str(shards_dir(cfg)),
                                "config": to_container(cfg)})


def _recorded(run: Path) -> Optional[dict]:
    path = run / RUN_FILE
    if not path.exists():
        return None
    try:
        return read_json(path, ("fingerprint", "identity"))
    except CorruptFile as e:
        log.warning("%s; writing it again (every part is checked against the fingerprint anyway)", e)
        return None


def _mismatch(run: Path, old: dict, identity: dict, fp: str, why: str) -> RunConfigMismatch:
    changes = _diff(old["identity"], identity)
    return RunConfigMismatch(
        f"{run} holds results of another configuration (fingerprint {old['fingerprint']}, now {fp}); "
        f"{why}. What changed: {'; '.join(changes[:8])}{' ...' if len(changes) > 8 else ''}. Use another "
        "run.dir, or set run.fresh=true to delete the old results and start again.")


def _diff(old, new, prefix: str = "") -> list[str]:  # noqa: ANN001
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------- a shard's results


def result_paths(run: Path, index: int) -> tuple[Path, Path, Path]:
    """(finished file, done marker, parts folder) of shard `index`."""
    base = Path(run) / RESULTS / shard_name(index)
    return base.with_suffix(".arrow"), base.with_suffix(".done.json"), base.with_suffix(".parts")


def fingerprint_of(table: pa.Table) -> str:
    """The config a results file was written under (its schema metadata)."""
    return ((table.schema.metadata or {}).get(b"rsd_batch.fingerprint") or b"").decode()


def shard_done(run: Path, index: int, fp: str, adopt: Optional[Callable[[pa.Table], Optional[str]]] = None) -> bool:
    """Whether shard `index` is finished under `fp`. A marker that is not valid JSON is set aside; a
    finished file without its marker (a crash between the two renames) is adopted only if `adopt`
    finds nothing wrong with it (its rows and ids), else it is set aside and the shard is redone."""
    final, done, parts = result_paths(run, index)
    if done.exists():
        try:
            if read_json(done, DONE_KEYS)["fingerprint"] != fp:
                return False
            if final.exists():
                return True
            move_to_corrupt(run, done, f"says the shard is done, but {final.name} is missing")
        except CorruptFile as e:
            move_to_corrupt(run, done, e.why)
    if final.exists():
        try:
            table = read_arrow(final)
            wrong = fingerprint_of(table) != fp and f"written under config {fingerprint_of(table)}, the run is {fp}"
            wrong = wrong or (adopt(table) if adopt is not None else None)
            if wrong:
                raise CorruptFile(final, wrong)
        except CorruptFile as e:
            move_to_corrupt(run, final, e.why)
            return False
        mark_done(final, done, parts, fp)
        return True
    return False


def mark_done(final: Path, done: Path, parts_dir: Path, fp: str) -> None:
    table = read_arrow(final, ["id"])
    write_json(done, {"fingerprint": fp, "rows": table.num_rows, "sha256": sha256_file(final)})
    shutil.rmtree(parts_dir, ignore_errors=True)


def shard_covered(table: pa.Table, ids: pa.Array, n: int) -> Optional[str]:
    """What is wrong with a finished shard's results against its shard's ids, or None: each id n
    times, in shard order (as the runner writes them)."""
    if table.num_rows != len(ids) * n:
        return f"{table.num_rows} samples where the shard has {len(ids)} x {n}"
    want = ids.take(pa.array(np.repeat(np.arange(len(ids)), n))) if n > 1 else ids
    got = table["id"].combine_chunks() if isinstance(table["id"], pa.ChunkedArray) else table["id"]
    if not got.equals(want.combine_chunks() if isinstance(want, pa.ChunkedArray) else want):
        return "its ids are not the shard's, each once per sample, in shard order"
    if n > 1 and not np.array_equal(table["sample_index"].to_numpy(), np.tile(np.arange(n), len(ids))):
        return "its sample indices are not 0..n-1 for every problem"
    return None


def part_name(seq: int, rows: int) -> str:
    # The row count in the name lets a resume scan count committed work from one directory listing.
    return f"part-{seq:05d}-n{rows}.arrow"


def part_rows(name: str) -> int:
    return int(name.rsplit("-n", 1)[1][:-6])


def next_part(parts_dir: Path) -> int:
    seqs = [int(p.name.split("-")[1]) for p in parts_dir.glob("part-*.arrow")] if parts_dir.exists() else []
    return max(seqs) + 1 if seqs else 0


def committed_parts(parts_dir: Path, fp: str, columns: Optional[list[str]] = None) -> list[pa.Table]:
    """The committed parts of a shard in progress, each checked (a readable footer, the rows its name
    says, the run's fingerprint); one that fails is set aside in <run>/corrupt/ and its samples are
    redone. The commit protocol allows only a torn last part after a machine crash, but any is caught."""
    run = parts_dir.parent.parent
    out = []
    for part in sorted(parts_dir.glob("part-*.arrow")):
        try:
            table = read_arrow(part, rows=part_rows(part.name))
            if fingerprint_of(table) != fp:
                raise CorruptFile(part, f"written under config {fingerprint_of(table) or '?'}, the run is {fp}")
        except CorruptFile as e:
            move_to_corrupt(run, part, e.why)
            continue
        out.append(table.select(columns) if columns else table)
    return out


def committed_keys(parts_dir: Path, fp: str) -> set[tuple[str, int]]:
    """(id, sample_index) of every committed sample of a shard in progress."""
    keys: set[tuple[str, int]] = set()
    for t in committed_parts(parts_dir, fp, ["id", "sample_index"]):
        keys.update(zip(t["id"].to_pylist(), t["sample_index"].to_pylist()))
    return keys


def committed_count(parts_dir: Path) -> int:
    """Samples committed in a shard's parts, counted from the part names (no file is opened)."""
    if not parts_dir.exists():
        return 0
    return sum(part_rows(name) for name in os.listdir(parts_dir)
               if name.startswith("part-") and name.endswith(".arrow"))


def shard_progress(run: Path, index: int, fp: Optional[str]) -> Optional[int]:
    """Samples committed of shard `index` under `fp`: None when it is done (a marker of that config;
    any marker when `fp` is None), else what its parts hold. Reads markers and names only."""
    _, done, parts = result_paths(run, index)
    if done.exists():
        try:
            if fp is None or read_json(done, DONE_KEYS)["fingerprint"] == fp:
                return None
        except CorruptFile:
            pass  # the runner sets it aside when it gets there
    return committed_count(parts)


def pending_work(run: Path, manifest: dict, fp: str, n: int, shard_ids: Callable[[int], pa.Array],
                 indices: Optional[Iterable[int]] = None) -> dict[int, int]:
    """Samples left per unfinished shard, read from the run folder alone (the resume scan);
    `shard_ids(i)`: shard i's ids, read only to adopt a finished file that lost its marker."""
    left = {}
    for i in (indices if indices is not None else range(len(manifest["shards"]))):
        if shard_done(run, i, fp, adopt=lambda t, i=i: shard_covered(t, shard_ids(i), n)):
            continue
        left[i] = manifest["shards"][i]["rows"] * n - committed_count(result_paths(run, i)[2])
    return left


@contextlib.contextmanager
def shard_lock(run: Path, index: int, wait: bool, poll_s: float = 1.0):
    """One writer per shard, in any launcher: an exclusive fcntl lock on <run>/locks/shard-N.lock,
    which the kernel drops when its process ends (so no lock outlives a crash). Yields whether it
    is held; with `wait`, polls until it is, saying who holds it once a minute."""
    lock_dir = Path(run) / LOCKS
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{shard_name(index)}.lock", "a+") as f:
        waited = 0.0
        while True:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not wait:
                    yield False
                    return
                if waited % 60 < poll_s:
                    f.seek(0)
                    log.info("%s is held by %s; waiting", f.name, f.read().strip() or "another process")
                time.sleep(poll_s)
                waited += poll_s
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield True
        finally:
            f.truncate(0)  # an empty lock file is a free one; a named holder with no lock died holding it


def lock_files(run: Path) -> list[Path]:
    return sorted((Path(run) / LOCKS).glob("*.lock")) if (Path(run) / LOCKS).exists() else []


def parts_folders(run: Path) -> list[Path]:
    return sorted((Path(run) / RESULTS).glob("shard-*.parts")) if (Path(run) / RESULTS).exists() else []
