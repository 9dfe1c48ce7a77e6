"""Sharding large problem sets: `rsd-batch shard` against plain pyarrow and `datasets`, time and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_shard.py [--rows 1000000 5000000] [--repeats 1]

For each size, one JSON-lines file of synthetic problems (~380 bytes a line, as bench_foundation.py
writes them), plus a copy with one whitespace-only line in the middle. Each contender runs in its own
process (peak RSS is that process's `ru_maxrss`), interleaved, on the same file:
  rsd-batch shard     rsd_batch.shards.write_shards with the default shard size (manifest, sha256s, fsync)
  pyarrow             pyarrow.json.read_json + one Arrow IPC file: the floor for read + write
  datasets            load_dataset("json") + save_to_disk(num_shards = the same count)
The issue's bars (15): shard within 2x pyarrow, at least as fast as datasets, peak RSS <= 1 GB at 5M
rows, and memory that does not double from 1M to 5M rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import write_problems  # noqa: E402


def child(kind: str, src: str, out: str) -> None:
    t = time.perf_counter()
    if kind == "shard":
        from omegaconf import OmegaConf

        from rsd_batch.config import DatasetConfig, FieldsConfig
        from rsd_batch.shards import write_shards
        cfg = OmegaConf.structured(DatasetConfig(name="bench", source=src, fields=FieldsConfig(id="id")))
        m = write_shards(cfg, Path(out))
        rows, shards = m["num_rows"], len(m["shards"])
    elif kind == "pyarrow":
        import pyarrow as pa
        import pyarrow.json as pjson
        table = pjson.read_json(src)
        with pa.OSFile(out + ".arrow", "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        rows, shards = len(table), 1
    else:
        import datasets
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=src, split="train", cache_dir=out + "-cache")
        shards = max(1, -(-len(ds) // max(250, -(-len(ds) // 1000))))
        ds.save_to_disk(out, num_shards=shards)
        rows = len(ds)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": secs, "peak_mb": peak, "rows": rows, "shards": shards}))


def run_child(kind: str, src: Path, work: Path) -> dict:
    out = work / f"out-{kind}"
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(out)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for p in work.glob(f"out-{kind}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(tempfile.mkdtemp(prefix="rsd-bench-shard-"))
    table = []
    try:
        for rows in args.rows:
            src = work / f"problems-{rows}.jsonl"
            write_problems(src, rows)
            blank = work / f"problems-{rows}-blank.jsonl"
            with open(src, "rb") as f, open(blank, "wb") as g:
                for i, line in enumerate(f):
                    g.write(b"   \n" if i == rows // 2 else line)
            mb = src.stat().st_size / 2**20
            print(f"{rows:,} rows, {mb:.0f} MiB", flush=True)
            for r in range(args.repeats):
                for kind, path, label in (("shard", src, "rsd-batch shard"), ("pyarrow", src, "pyarrow"),
                                          ("datasets", src, "datasets"),
                                          ("shard", blank, "rsd-batch shard, one blank line")):
                    res = run_child(kind, path, work)
                    table.append((rows, label, res))
                    print(f"  {label}: {res['seconds']:.1f} s, {res['peak_mb']:.0f} MB", flush=True)
            src.unlink()
            blank.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nOMP_NUM_THREADS=1, {os.cpu_count()} cores; peak = the process's max RSS\n")
    print("| rows | contender | shards | seconds | peak RSS (MB) | vs pyarrow | vs datasets |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        best = {}
        for r, label, res in table:
            if r == rows:
                best.setdefault(label, []).append(res)
        base = min(x["seconds"] for x in best["pyarrow"])
        ds = min(x["seconds"] for x in best["datasets"])
        for label, runs in best.items():
            secs = min(x["seconds"] for x in runs)
            print(f"| {rows:,} | {label} | {runs[0]['shards']} | {secs:.2f} | {max(x['peak_mb'] for x in runs):.0f} | "
                  f"{secs / base:.2f}x | {secs / ds:.2f}x |")


if __name__ == "__main__":
    main()
