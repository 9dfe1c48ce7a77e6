"""Running shards: batches, atomic part commits, resume inside a shard, refusing mixed configs.

    <run>/run.json                          the run's fingerprint and the resolved config behind it
    <run>/results/shard-00000.parts/part-00000.arrow ...   committed batches of a shard in progress
    <run>/results/shard-00000.arrow         the finished shard (rows in shard order)
    <run>/results/shard-00000.done.json     written last: fingerprint, rows, sha256

A batch is committed as one Arrow file renamed into place, so after a crash (even SIGKILL) every
sample is either in exactly one part or not started; a relaunch reads the parts' ids and does the
rest. Knows nothing about SLURM: a launcher calls `run_shard` for the shards it was given.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import numpy as np
import pyarrow as pa

from .config import Config, EngineName, method_identity, to_container
from .errors import UserError
from .files import (CorruptFile, fingerprint, move_to_corrupt, read_arrow, read_json, sha256_file, write_arrow,
                    write_json)
from .grading import extract_answer, is_correct
from .ledger import LEDGER_TYPE
from .shards import read_manifest, read_shard, shard_name

if TYPE_CHECKING:  # the decode side (torch) loads only when a shard really runs
    from .methods import Context, Method, Result

log = logging.getLogger(__name__)
RUN_FILE = "run.json"

STEP_TYPE = pa.struct([("text", pa.string()), ("source", pa.string()), ("reward", pa.float64()),
                       ("accepted", pa.bool_()), ("rejected_text", pa.string()),
                       ("rejected_reward", pa.float64())])
OUTPUT_FIELDS = [
    ("sample_index", pa.int32()), ("shard", pa.int32()), ("output", pa.string()),
    ("steps", pa.list_(STEP_TYPE)), ("num_steps", pa.int32()), ("finish_reason", pa.string()),
    ("extracted_answer", pa.string()), ("correct", pa.bool_()), ("error", pa.string()),
    ("ledger", LEDGER_TYPE),
]


class RunConfigMismatch(UserError, RuntimeError):
    pass


def shards_dir(cfg: Config) -> Path:
    return Path(cfg.run.shards_from or cfg.run.dir)


def run_identity(cfg: Config, manifest: dict, method: Method) -> dict:
    """Everything that decides a run's outputs, and nothing that does not (batch size, launcher)."""
    identity = {
        "shards": manifest["fingerprint"],
        "method": method_identity(cfg.method),
        "prompt": to_container(cfg.prompt),
        "seed": cfg.run.seed,
        "models": {},
    }
    if cfg.engine.name != EngineName.hf:  # sampled outputs differ by engine (hf: the earlier runs' one)
        identity["engine"] = cfg.engine.name.value
    from .models import model_content, model_roles

    loaded = model_roles(cfg, method.roles(cfg.method))
    for role in method.roles(cfg.method):
        node = cfg.prm if role == "prm" else cfg.model[role]
        entry = to_container(node)
        entry.pop("device", None)  # where it runs, not what it computes
        if role in loaded:  # the files, not where they lie: a copy elsewhere is the same model
            entry.pop("path")
            entry["content"] = model_content(node.path, node.get("revision"))
        identity["models"][role] = entry
    return identity


def claim_run_dir(run_dir: Path, cfg: Config, identity: dict) -> tuple[str, bool]:
    """This run's fingerprint, refusing a folder that holds another config's results (unless
    run.fresh). Returns (fingerprint, whether run.json must be written): `record_run` writes it once
    the models have loaded, so a run that cannot load never claims the folder."""
    fp = fingerprint(identity)
    path = run_dir / RUN_FILE
    if path.exists():
        try:
            old = read_json(path, ("fingerprint", "identity"))
        except CorruptFile as e:
            log.warning("%s; writing it again (every part is checked against the fingerprint anyway)", e)
            return fp, True
        if old["fingerprint"] != fp:
            if not cfg.run.fresh:
                changes = _diff(old["identity"], identity)
                raise RunConfigMismatch(
                    f"{run_dir} holds results of another configuration (fingerprint "
                    f"{old['fingerprint']}, now {fp}); reusing them would mix two configs. "
                    f"What changed: {'; '.join(changes[:8])}"
                    f"{' ...' if len(changes) > 8 else ''}. Use another run.dir, or set "
                    "run.fresh=true to delete the old results and start again.")
            log.warning("run.fresh=true: deleting the results of config %s in %s", old["fingerprint"], run_dir)
            shutil.rmtree(run_dir / "results", ignore_errors=True)
            shutil.rmtree(run_dir / "merged", ignore_errors=True)
            path.unlink()
        elif old.get("shards_dir") == str(shards_dir(cfg).resolve()):
            return fp, False
    return fp, True


def record_run(run_dir: Path, cfg: Config, identity: dict, fp: str) -> None:
    write_json(run_dir / RUN_FILE, {"fingerprint": fp, "identity": identity,
                                    "shards_dir": str(shards_dir(cfg).resolve()),
                                    "config": to_container(cfg)})


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------- one shard


def result_paths(run_dir: Path, index: int) -> tuple[Path, Path, Path]:
    base = Path(run_dir) / "results" / shard_name(index)
    return base.with_suffix(".arrow"), base.with_suffix(".done.json"), base.with_suffix(".parts")


def shard_done(run_dir: Path, index: int, fp: str, adopt: Optional[Callable[[pa.Table], Optional[str]]] = None) -> bool:
    """Whether shard `index` is finished under `fp`. A marker that is not valid JSON is set aside; a
    finished file without its marker (a crash between the two renames) is adopted only if `adopt`
    finds nothing wrong with it (its rows and ids), else it is set aside and the shard is redone."""
    final, done, parts = result_paths(run_dir, index)
    if done.exists():
        try:
            if read_json(done, DONE_KEYS)["fingerprint"] != fp:
                return False
            if final.exists():
                return True
            move_to_corrupt(run_dir, done, f"says the shard is done, but {final.name} is missing")
        except CorruptFile as e:
            move_to_corrupt(run_dir, done, e.why)
    if final.exists():
        try:
            table = read_arrow(final)
            wrong = _fingerprint_of(table) != fp and f"written under config {_fingerprint_of(table)}, the run is {fp}"
            wrong = wrong or (adopt(table) if adopt is not None else None)
            if wrong:
                raise CorruptFile(final, wrong)
        except CorruptFile as e:
            move_to_corrupt(run_dir, final, e.why)
            return False
        _mark_done(final, done, parts, fp)
        return True
    return False


DONE_KEYS = ("fingerprint", "rows", "sha256")


def _fingerprint_of(table: pa.Table) -> str:
    return ((table.schema.metadata or {}).get(b"rsd_batch.fingerprint") or b"").decode()


def shard_covered(table: pa.Table, ids: pa.Array, n: int) -> Optional[str]:
    """What is wrong with a finished shard's results against its shard's ids, or None: each id n
    times, in shard order (as `_finish_shard` writes them)."""
    if table.num_rows != len(ids) * n:
        return f"{table.num_rows} samples where the shard has {len(ids)} x {n}"
    want = ids.take(pa.array(np.repeat(np.arange(len(ids)), n))) if n > 1 else ids
    got = table["id"].combine_chunks() if isinstance(table["id"], pa.ChunkedArray) else table["id"]
    if not got.equals(want.combine_chunks() if isinstance(want, pa.ChunkedArray) else want):
        return "its ids are not the shard's, each once per sample, in shard order"
    if n > 1 and not np.array_equal(table["sample_index"].to_numpy(), np.tile(np.arange(n), len(ids))):
        return "its sample indices are not 0..n-1 for every problem"
    return None


def committed_parts(parts_dir: Path, fp: str, columns: Optional[list[str]] = None) -> list[pa.Table]:
    """The committed parts of a shard in progress, each checked (a readable footer, the rows its name
    says, the run's fingerprint); one that fails is set aside in <run>/corrupt/ and its samples are
    redone. The commit protocol allows only a torn last part after a machine crash, but any is caught."""
    run_dir = parts_dir.parent.parent
    out = []
    for part in sorted(parts_dir.glob("part-*.arrow")):
        try:
            table = read_arrow(part, rows=_part_rows(part.name))
            if _fingerprint_of(table) != fp:
                raise CorruptFile(part, f"written under config {_fingerprint_of(table) or '?'}, the run is {fp}")
        except CorruptFile as e:
            move_to_corrupt(run_dir, part, e.why)
            continue
        out.append(table.select(columns) if columns else table)
    return out


def committed_keys(parts_dir: Path, fp: str) -> set[tuple[str, int]]:
    """(id, sample_index) of every committed sample of a shard in progress."""
    keys: set[tuple[str, int]] = set()
    for t in committed_parts(parts_dir, fp, ["id", "sample_index"]):
        keys.update(zip(t["id"].to_pylist(), t["sample_index"].to_pylist()))
    return keys


def _part_rows(name: str) -> int:
    return int(name.rsplit("-n", 1)[1][:-6])


def _next_part(parts_dir: Path) -> int:
    seqs = [int(p.name.split("-")[1]) for p in parts_dir.glob("part-*.arrow")] if parts_dir.exists() else []
    return max(seqs) + 1 if seqs else 0


def part_name(seq: int, rows: int) -> str:
    # The row count in the name lets a resume scan count committed work from one directory listing.
    return f"part-{seq:05d}-n{rows}.arrow"


def committed_count(parts_dir: Path) -> int:
    """Samples committed in a shard's parts, counted from the part names (no file is opened)."""
    return sum(int(name.rsplit("-n", 1)[1][:-6]) for name in os.listdir(parts_dir)
               if name.startswith("part-") and name.endswith(".arrow"))


def run_shard(run_dir: Path, shards_root: Path, manifest: dict, index: int, method: Method, ctx: Context,
              fp: str, batch_size: int, on_batch: Optional[Callable[[list[Result]], None]] = None,
              should_stop: Optional[Callable[[], bool]] = None) -> bool:
    """Run what is left of one shard; returns True when the shard is complete."""
    from .methods import Task

    final, done, parts_dir = result_paths(run_dir, index)
    table = read_shard(shards_root, manifest, index)
    n = ctx.method.n
    if shard_done(run_dir, index, fp, adopt=lambda t: shard_covered(t, table["id"].combine_chunks(), n)):
        return True
    seen = committed_keys(parts_dir, fp) if parts_dir.exists() else set()
    ids, problems = table["id"].to_pylist(), table["problem"].to_pylist()
    row_of = {key: row for row, key in enumerate(ids)}
    todo = [(row, k) for row in range(len(table)) for k in range(n) if (ids[row], k) not in seen]
    next_part = _next_part(parts_dir)
    stopped = False

    def tasks():
        nonlocal stopped
        for row, k in todo:
            if should_stop is not None and should_stop():
                stopped = True  # take no new work; what is in flight finishes and is committed
                return
            yield Task(ids[row], k, problems[row])

    buffer: list[tuple[Task, Result]] = []

    def commit() -> None:
        nonlocal next_part
        batch = [(row_of[t.id], t.sample_index) for t, _ in buffer]
        part = records_table(table, index, batch, [r for _, r in buffer], fp)
        write_arrow(parts_dir / part_name(next_part, len(batch)), part)
        next_part += 1
        if on_batch is not None:
            on_batch([r for _, r in buffer])
        buffer.clear()

    for task, result in method.run(tasks(), ctx):
        buffer.append((task, result))
        if len(buffer) >= batch_size:
            commit()
    if buffer:
        commit()
    if stopped:
        return False
    _finish_shard(parts_dir, final, done, fp, len(table) * n)
    return True


@contextlib.contextmanager
def shard_lock(run_dir: Path, index: int, wait: bool, poll_s: float = 1.0):
    """One writer per shard, in any launcher: an exclusive fcntl lock on <run>/locks/shard-N.lock,
    which the kernel drops when its process ends (so no lock outlives a crash). Yields whether it
    is held; with `wait`, polls until it is, saying who holds it once a minute."""
    lock_dir = Path(run_dir) / "locks"
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


def _problems(shards_root: Path, manifest: dict, index: int) -> list[tuple[str, str]]:
    t = read_shard(shards_root, manifest, index, verify=False)  # run_shard verifies it when it runs it
    return list(zip(t["id"].to_pylist(), t["problem"].to_pylist()))


def records_table(shard: pa.Table, index: int, batch: list[tuple[int, int]], results: list[Result],
                  fp: str) -> pa.Table:
    """One Arrow table of output records: the shard's columns for each task, then what was decoded."""
    base = shard.take(pa.array([row for row, _ in batch], pa.int64()))
    golds = base["answer"].to_pylist()
    out = {
        "sample_index": [k for _, k in batch],
        "shard": [index] * len(batch),
        "output": [r.output for r in results],
        "steps": [[asdict(s) for s in r.steps] for r in results],
        "num_steps": [len(r.steps) for r in results],
        "finish_reason": [r.finish_reason for r in results],
        "extracted_answer": [], "correct": [], "error": [r.error for r in results],
        "ledger": [r.ledger.to_record() for r in results],
    }
    for r, gold in zip(results, golds):
        pred = extract_answer(r.output) if r.error is None else None
        out["extracted_answer"].append(pred)
        out["correct"].append(is_correct(pred, gold) if r.error is None else (None if gold is None else False))
    for name, typ in OUTPUT_FIELDS:
        base = base.append_column(pa.field(name, typ), pa.array(out[name], typ))
    return base.replace_schema_metadata({"rsd_batch.fingerprint": fp})


def _finish_shard(parts_dir: Path, final: Path, done: Path, fp: str, expected: int) -> None:
    table = pa.concat_tables(committed_parts(parts_dir, fp))
    if table.num_rows != expected:
        raise RuntimeError(f"{parts_dir}: {table.num_rows} committed samples, expected {expected}; "
                           "the parts were changed by something else. Delete the folder to redo the shard.")
    # Shard order, whatever the order of commits: the finished file does not depend on crashes.
    order = [("source_row", "ascending"), ("sample_index", "ascending")]
    if "source_file" in table.column_names:  # a set of several files: rows count within each file
        order.insert(0, ("source_file", "ascending"))
    write_arrow(final, table.sort_by(order))
    _mark_done(final, done, parts_dir, fp)


def _mark_done(final: Path, done: Path, parts_dir: Path, fp: str) -> None:
    table = read_arrow(final, ["id"])
    write_json(done, {"fingerprint": fp, "rows": table.num_rows, "sha256": sha256_file(final)})
    shutil.rmtree(parts_dir, ignore_errors=True)


# ---------------------------------------------------------------- all shards of a run


def pending_work(run_dir: Path, manifest: dict, fp: str, n: int,
                 indices: Optional[Iterable[int]] = None, shards_root: Optional[Path] = None) -> dict[int, int]:
    """Samples left per unfinished shard, read from the run folder alone (the resume scan)."""
    left = {}
    for i in (indices if indices is not None else range(len(manifest["shards"]))):
        if shard_done(run_dir, i, fp, adopt=lambda t, i=i: shard_covered(
                t, read_shard(Path(run_dir if shards_root is None else shards_root), manifest, i)["id"]
                .combine_chunks(), n)):
            continue
        _, _, parts = result_paths(run_dir, i)
        left[i] = manifest["shards"][i]["rows"] * n - (committed_count(parts) if parts.exists() else 0)
    return left


class Progress:
    """One progress line: samples done, samples/s, ETA, running acceptance and FLOPs saved.

    On a terminal it is a tqdm bar; otherwise (a SLURM log) the same line is logged every `every_s`
    seconds (run.progress_every_s) and once at the end.
    """

    def __init__(self, total: int, name: str, enabled: bool = True, every_s: float = 30.0):
        import sys

        from tqdm import tqdm

        self.total, self.name, self.every_s, self.enabled = total, name, every_s, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=name, unit="sample", mininterval=1.0, dynamic_ncols=True,
                        disable=not self.tty)
        self.done = self.decided = self.accepted = self.flops = self.target_only = 0
        self.shard = ""
        self.start = self.last_log = time.perf_counter()

    def update(self, results: list[Result]) -> None:
        self.done += len(results)
        for r in results:
            for s in r.steps:
                if s.accepted is not None:
                    self.decided += 1
                    self.accepted += bool(s.accepted)
            self.flops += r.ledger.flops
            self.target_only += r.ledger.target_only_flops
        line = self.describe()
        if self.tty:
            self.bar.set_postfix_str(line, refresh=False)
            self.bar.update(len(results))
        elif self.enabled and time.perf_counter() - self.last_log >= self.every_s:
            self._log(line)

    def _log(self, line: str) -> None:
        self.last_log = time.perf_counter()
        rate = self.done / max(self.last_log - self.start, 1e-9)
        log.info("%s: %d/%d samples, %.2f samples/s, ETA %.0f s, %s", self.name, self.done, self.total,
                 rate, (self.total - self.done) / rate if rate else float("inf"), line)

    def describe(self) -> str:
        parts = [self.shard]
        if self.decided:
            parts.append(f"accepted {self.accepted / self.decided:.0%}")
        if self.target_only and self.flops:
            parts.append(f"FLOPs {self.target_only / self.flops:.2f}x fewer than target")
        return " ".join(p for p in parts if p)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and not self.tty and self.done:
            self._log(self.describe())  # the final tally, however short the run
        self.bar.close()


def load_models(cfg: Config, roles: Iterable[str]) -> dict:
    """Each role's model on the configured engine, loaded one after another."""
    from .models import ModelLoadError, load_causal_lm, share_vocab

    roles = list(roles)
    if cfg.engine.name == EngineName.vllm:
        from .engine import vllm
        from .models import memory_plan

        plan = memory_plan(cfg, roles, cfg.run.batch_size)
        models = {r: vllm.load_prm(cfg, plan) if r == "prm" else vllm.load_policy(cfg, r, plan) for r in roles}
    else:
        models = {}
        for role in roles:
            node = cfg.prm if role == "prm" else cfg.model[role]
            try:
                if role == "prm":
                    from .prms import load_prm
                    models[role] = load_prm(cfg.prm)
                else:
                    models[role] = load_causal_lm(cfg.model[role], role)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated file, a wrong architecture...: one line, the cause
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ModelLoadError(f"the {role} model ({'prm' if role == 'prm' else 'model.' + role}.path="
                                     f"{node.path}) did not load: {type(e).__name__}: {first[:300]}") from None
    share_vocab(models)
    return models


def run(cfg: Config, shard_indices: Optional[list[int]] = None,
        should_stop: Optional[Callable[[], bool]] = None, models: Optional[dict] = None) -> dict:
    """Run every pending shard (or the given ones) in this process. Returns a small report.

    `should_stop` is polled between batches (a launcher's preemption flag): when it turns true the
    run stops after the last committed batch and the report's "complete" is False. `models` (role ->
    loaded model) is a cache a caller running several configs of the same models passes each time:
    the roles it lacks are loaded into it, so each model loads once.
    """
    run_dir = Path(cfg.run.dir)
    manifest = read_manifest(shards_dir(cfg))
    from .methods import Context, get_method
    from .models import check_memory, check_model_files, memory_plan, share_vocab

    method = get_method(cfg.method.name.value)

    # Before anything is written or loaded: are the model files there, and will they and their caches fit?
    check_model_files(cfg, method.roles(cfg.method))
    log.info("memory plan (weights + KV budget for %d sequences in flight):\n%s", cfg.run.batch_size,
             check_memory(memory_plan(cfg, method.roles(cfg.method), cfg.run.batch_size)))
    identity = run_identity(cfg, manifest, method)
    fp, unrecorded = claim_run_dir(run_dir, cfg, identity)
    indices = shard_indices if shard_indices is not None else range(len(manifest["shards"]))
    left_by_shard = pending_work(run_dir, manifest, fp, cfg.method.n, indices, shards_dir(cfg))
    pending = sorted(left_by_shard)
    report = {"run_dir": str(run_dir), "fingerprint": fp, "shards": len(manifest["shards"]),
              "skipped": len(list(indices)) - len(pending), "ran": pending, "complete": True}
    if not pending:
        if unrecorded:
            record_run(run_dir, cfg, identity, fp)
        log.info("all %d shards of %s are done (fingerprint %s)", len(list(indices)), run_dir, fp)
        return report
    left = sum(left_by_shard.values())
    log.info("%d of %d shards to run, %d samples left; results in %s",
             len(pending), len(list(indices)), left, run_dir / "results")
    roles = method.roles(cfg.method)
    if not models:  # before any model loads: does every pending prompt fit the context?
        from .models import check_prompt_lengths
        check_prompt_lengths(cfg, roles, [pair for i in pending for pair in _problems(shards_dir(cfg), manifest, i)])
    models = {} if models is None else models
    models.update(load_models(cfg, [r for r in roles if r not in models]))
    share_vocab({r: models[r] for r in roles})
    if unrecorded:
        record_run(run_dir, cfg, identity, fp)
    ctx = Context(models={r: models[r] for r in roles}, method=cfg.method, prompt=cfg.prompt,
                  seed=cfg.run.seed, batch_size=cfg.run.batch_size)
    t0 = time.perf_counter()
    complete = True
    with Progress(left, method.name, cfg.run.progress, cfg.run.progress_every_s) as progress:
        busy: list[int] = []  # shards another process holds: theirs first, then wait and check them
        for i in pending + [None] + busy:
            if i is None:
                if busy:
                    log.info("%d shards are held by another process on %s; waiting for them",
                             len(busy), run_dir)
                continue
            with shard_lock(run_dir, i, wait=i in busy) as held:
                if not held:
                    busy.append(i)
                    continue
                progress.shard = shard_name(i)
                if not run_shard(run_dir, shards_dir(cfg), manifest, i, method, ctx, fp, cfg.run.batch_size,
                                 on_batch=progress.update, should_stop=should_stop):
                    complete = False
                    break
    report["seconds"] = time.perf_counter() - t0
    report["complete"] = complete
    return report
