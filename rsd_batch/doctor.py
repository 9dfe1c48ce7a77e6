"""`rsd-batch doctor <run>`: verify every file of a run folder, changing nothing, and say what repairs it.

Checks what `run` and `merge` check when they read (manifest and shards against their sha256, run.json,
markers, finished results against their marker and their shard's ids, every committed part), plus what
they never meet: parts of shards the manifest does not have, and lock files no process holds.
`repair=true` applies the safe repairs: damaged parts, markers and results are set aside in
<run>/corrupt/ (their samples are then redone by `rsd-batch run`), stale lock files are removed.
"""
from __future__ import annotations

import fcntl
from pathlib import Path

from . import rundir
from .files import CorruptFile, read_arrow, read_json
from .rundir import DONE_KEYS, RUN_FILE, fingerprint_of, move_to_corrupt, part_rows, result_paths, shard_covered
from .shards import ShardError, read_manifest, read_shard


def examine(run_dir: Path, repair: bool = False) -> dict:
    run_dir = Path(run_dir)
    findings: list[dict] = []

    def found(path: Path, problem: str, fix: str, set_aside: bool = False) -> None:
        done = False
        if repair and set_aside and path.exists():
            move_to_corrupt(run_dir, path, problem)
            done = True
        findings.append({"path": str(path), "problem": problem, "fix": fix, "repaired": done})

    rerun = f"rsd-batch run run.dir={run_dir}"
    reshard = f"rsd-batch shard run.dir={run_dir} dataset=<the same dataset config>"
    fp = None
    shards_root = run_dir
    if (run_dir / RUN_FILE).exists():
        try:
            info = read_json(run_dir / RUN_FILE, ("fingerprint", "identity", "shards_dir"))
            fp, shards_root = info["fingerprint"], Path(info["shards_dir"])
        except CorruptFile as e:
            found(e.path, e.why, f"{rerun} (it writes run.json again; every part is checked against "
                                 "the run's config)", set_aside=True)
    try:
        manifest = read_manifest(shards_root)
    except ShardError as e:
        findings.append({"path": str(shards_root / rundir.MANIFEST), "problem": str(e), "fix": reshard,
                         "repaired": False})
        return {"run_dir": str(run_dir), "findings": findings, "shards": 0}
    n = (info["identity"]["method"]["n"] if fp else 1)
    for entry in manifest["shards"]:
        try:
            ids = read_shard(shards_root, manifest, entry["index"])["id"].combine_chunks()
        except ShardError as e:
            findings.append({"path": str(shards_root / entry["path"]), "problem": str(e).split(". Run")[0],
                             "fix": reshard + " (it writes the same bytes again and keeps the results)",
                             "repaired": False})
            ids = None
        final, done, parts = result_paths(run_dir, entry["index"])
        if done.exists():
            try:
                marker = read_json(done, DONE_KEYS)
                if fp and marker["fingerprint"] != fp:
                    found(done, f"written under config {marker['fingerprint']}, the run is {fp}",
                          f"{rerun} (it redoes the shard under the run's config)")
                elif not final.exists():
                    found(done, f"says the shard is done, but {final.name} is missing",
                          f"delete {done}, then {rerun}", set_aside=True)
                else:
                    table = read_arrow(final, rows=marker["rows"], sha256=marker["sha256"])
                    wrong = ids is not None and shard_covered(table, ids, n)
                    if wrong:
                        found(final, f"done, but its samples do not match the manifest: {wrong}",
                              f"delete {final} and {done}, then {rerun}", set_aside=True)
                        if repair:
                            move_to_corrupt(run_dir, done, "its results were set aside")
            except CorruptFile as e:
                found(e.path, e.why, f"delete {final} and {done}, then {rerun}", set_aside=True)
                if repair and done.exists():
                    move_to_corrupt(run_dir, done, "its results were set aside")
        if parts.exists():
            for part in sorted(parts.glob("part-*.arrow")):
                try:
                    t = read_arrow(part, rows=part_rows(part.name))
                    if fp and fingerprint_of(t) != fp:
                        raise CorruptFile(part, f"written under config {fingerprint_of(t) or '?'}, the run is {fp}")
                except CorruptFile as e:
                    found(part, e.why, f"{rerun} (it sets the part aside and redoes its samples)", set_aside=True)
    known = {result_paths(run_dir, e["index"])[2].name for e in manifest["shards"]}
    for parts in rundir.parts_folders(run_dir):
        if parts.name not in known:
            for part in sorted(parts.glob("part-*.arrow")):
                found(part, "a part of a shard the manifest does not have",
                      "nothing needs it; repair=true sets it aside", set_aside=True)
    for lock in rundir.lock_files(run_dir):
        with open(lock, "a+") as f:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held by a live process: not stale
            f.seek(0)
            holder = f.read().strip()
        if holder:
            findings.append({"path": str(lock), "problem": f"a lock file left by {holder}, held by no process",
                             "fix": "harmless (locks die with their process); repair=true removes it",
                             "repaired": False})
            if repair:
                lock.unlink(missing_ok=True)
                findings[-1]["repaired"] = True
    return {"run_dir": str(run_dir), "findings": findings, "shards": len(manifest["shards"])}


def format_findings(report: dict) -> str:
    f = report["findings"]
    if not f:
        return f"{report['run_dir']}: {report['shards']} shards, every file verified; nothing to repair."
    lines = [f"{report['run_dir']}: {len(f)} problems"]
    for x in f:
        lines.append(f"- {x['path']}: {x['problem']}\n  {'repaired (set aside)' if x['repaired'] else 'fix: ' + x['fix']}")
    if any(not x["repaired"] for x in f):
        lines.append(f"`rsd-batch doctor {report['run_dir']} repair=true` applies the safe repairs; "
                     "then run the commands above.")
    return "\n".join(lines)
