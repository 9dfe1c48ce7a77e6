"""A real `rsd-batch run` killed with SIGKILL at random batches, then resumed: every sample once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import datasets

from rsd_batch.merge import merge_run
from rsd_batch.runner import run
from rsd_batch.shards import write_shards

from conftest import CLI, cli, make_config


def committed(run_dir: Path) -> int:
    results = run_dir / "results"
    if not results.exists():
        return 0
    parts = len(list(results.glob("*.parts/part-*.arrow")))
    return parts + 8 * len(list(results.glob("*.done.json")))  # batch_size=1, 8 rows a shard


def test_sigkill_mid_shard_resumes_exactly_once(tiny_run_args, tmp_path):
    args = [a for a in tiny_run_args if not a.startswith(("run.batch_size", "method.max_new_tokens"))]
    args += ["run.batch_size=1", "method.max_new_tokens=40"]
    ref_dir, kill_dir = tmp_path / "reference", tmp_path / "killed"
    ref = make_config(*args, f"run.dir={ref_dir}")
    write_shards(ref.dataset, ref_dir)
    run(ref)
    merge_run(ref_dir)

    cli("shard", *args, f"run.dir={kill_dir}")
    rng = random.Random(1234)
    kills = mid_shard = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(4):
        target = committed(kill_dir) + rng.randint(1, 5)
        if target >= 24:
            break
        proc = subprocess.Popen([CLI, "run", *args, f"run.dir={kill_dir}"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while committed(kill_dir) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Killed in the middle of a shard: some of its batches committed, the rest not.
        mid_shard += bool(list((kill_dir / "results").glob("*.parts/part-*.arrow")))
    assert kills >= 3 and mid_shard >= 2
    assert committed(kill_dir) < 24
    cli("run", *args, f"run.dir={kill_dir}")
    summary = merge_run(kill_dir)
    assert summary["samples"] == 24 == summary["problems"]

    def load(d):
        t = datasets.load_dataset("parquet", data_files=str(d / "merged/data.parquet"), split="train")
        return {r["id"]: r["output"] for r in t}, t["id"]

    got, got_ids = load(kill_dir)
    want, want_ids = load(ref_dir)
    assert sorted(got_ids) == sorted(want_ids) and len(set(got_ids)) == 24  # exactly once
    assert got == want  # greedy: the same texts as the uninterrupted run
