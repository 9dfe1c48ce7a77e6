"""Running shards: batches, atomic part commits, resume inside a shard.

A batch is committed as one Arrow file renamed into place, so after a crash (even SIGKILL) every
sample is either in exactly one part or not started; a relaunch reads the parts' ids and does the
rest. Where each result lies, which shards are done and whether a folder holds another config's
results is rundir's to say. Knows nothing about SLURM: a launcher calls `run_shard` for the shards it was given.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import pyarrow as pa

from . import rundir
from .config import Config, EngineName, method_identity, to_container
from .errors import UserError
from .files import write_arrow
from .grading import extract_answer, is_correct
from .ledger import LEDGER_TYPE
from .rundir import committed_keys, committed_parts, result_paths, shard_done, shard_covered, shard_lock, shard_name
from .shards import read_manifest, read_shard

if TYPE_CHECKING:  # the decode side (torch) loads only when a shard really runs
    from .methods import Context, Method, Result

log = logging.getLogger(__name__)

STEP_TYPE = pa.struct([("text", pa.string()), ("source", pa.string()), ("reward", pa.float64()),
                       ("accepted", pa.bool_()), ("rejected_text", pa.string()),
                       ("rejected_reward", pa.float64())])
OUTPUT_FIELDS = [
    ("sample_index", pa.int32()), ("shard", pa.int32()), ("output", pa.string()),
    ("steps", pa.list_(STEP_TYPE)), ("num_steps", pa.int32()), ("finish_reason", pa.string()),
    ("extracted_answer", pa.string()), ("correct", pa.bool_()), ("error", pa.string()),
    ("ledger", LEDGER_TYPE),
]


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


# ---------------------------------------------------------------- one shard


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
    next_part = rundir.next_part(parts_dir)
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
        write_arrow(parts_dir / rundir.part_name(next_part, len(batch)), part)
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


def shard_ids(shards_root: Path, manifest: dict) -> Callable[[int], pa.Array]:
    """Shard i's ids, for rundir's adoption check of a finished file that lost its marker."""
    return lambda i: read_shard(shards_root, manifest, i)["id"].combine_chunks()


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
    rundir.mark_done(final, done, parts_dir, fp)


# ---------------------------------------------------------------- all shards of a run


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
    run_dir, shards_root = rundir.run_dir(cfg), rundir.shards_dir(cfg)
    manifest = read_manifest(shards_root)
    from .methods import Context, get_method
    from .models import check_memory, check_model_files, memory_plan, share_vocab

    method = get_method(cfg.method.name.value)

    # Before anything is written or loaded: are the model files there, and will they and their caches fit?
    check_model_files(cfg, method.roles(cfg.method))
    log.info("memory plan (weights + KV budget for %d sequences in flight):\n%s", cfg.run.batch_size,
             check_memory(memory_plan(cfg, method.roles(cfg.method), cfg.run.batch_size)))
    identity = run_identity(cfg, manifest, method)
    fp, unrecorded = rundir.claim(run_dir, cfg, identity)
    indices = shard_indices if shard_indices is not None else range(len(manifest["shards"]))
    left_by_shard = rundir.pending_work(run_dir, manifest, fp, cfg.method.n, shard_ids(shards_root, manifest), indices)
    pending = sorted(left_by_shard)
    report = {"run_dir": str(run_dir), "fingerprint": fp, "shards": len(manifest["shards"]),
              "skipped": len(list(indices)) - len(pending), "ran": pending, "complete": True}
    if not pending:
        if unrecorded:
            rundir.record(run_dir, cfg, identity, fp)
        log.info("all %d shards of %s are done (fingerprint %s)", len(list(indices)), run_dir, fp)
        return report
    log.info("%d of %d shards to run, %d samples left; results in %s",
             len(pending), len(list(indices)), sum(left_by_shard.values()), run_dir / rundir.RESULTS)
    roles = method.roles(cfg.method)
    if not models:  # before any model loads: does every pending prompt fit the context?
        from .models import check_prompt_lengths
        check_prompt_lengths(cfg, roles, [pair for i in pending for pair in _problems(shards_root, manifest, i)])
    models = {} if models is None else models
    models.update(load_models(cfg, [r for r in roles if r not in models]))
    share_vocab({r: models[r] for r in roles})
    if unrecorded:
        rundir.record(run_dir, cfg, identity, fp)
    ctx = Context(models={r: models[r] for r in roles}, method=cfg.method, prompt=cfg.prompt,
                  seed=cfg.run.seed, batch_size=cfg.run.batch_size)
    t0 = time.perf_counter()
    with Progress(sum(left_by_shard.values()), method.name, cfg.run.progress, cfg.run.progress_every_s) as progress:
        report["complete"] = _run_pending(cfg, manifest, pending, method, ctx, fp, progress, should_stop)
    report["seconds"] = time.perf_counter() - t0
    return report


def _run_pending(cfg: Config, manifest: dict, pending: list[int], method: Method, ctx: Context, fp: str,
                 progress: Progress, should_stop: Optional[Callable[[], bool]]) -> bool:
    """Each pending shard under its lock; those another process holds last, waiting for them (they
    are done then, or taken over). False when `should_stop` stopped it."""
    run_dir, shards_root = rundir.run_dir(cfg), rundir.shards_dir(cfg)
    busy: list[int] = []
    for wait, indices in ((False, pending), (True, busy)):
        if wait and busy:
            log.info("%d shards are held by another process on %s; waiting for them", len(busy), run_dir)
        for i in indices:
            with shard_lock(run_dir, i, wait=wait) as held:
                if not held:
                    busy.append(i)
                    continue
                progress.shard = shard_name(i)
                if not run_shard(run_dir, shards_root, manifest, i, method, ctx, fp, cfg.run.batch_size,
                                 on_batch=progress.update, should_stop=should_stop):
                    return False
    return True
