"""Foundation at scale: shard, resume-scan and merge a run of 1,000,000 problems, without models.

    python benchmarks/bench_foundation.py [--rows 1000000] [--shard-size N] [--part-rows 64]

Builds a JSON-lines problem set of `rows` synthetic problems (~300 characters each), then times:
  shard           read + validate + hash ids + write Arrow shards and the manifest
  resume scan     what `rsd-batch run` reads to find the work left, for a run whose every sample is
                  committed as batch parts (the worst case: no shard finalised yet) and for a run
                  whose shards are all finished; then the committed ids of the one shard it resumes
  merge           coverage proof against the manifest + one Parquet dataset + summary, against the
                  anchor: read the result shards, concatenate, write zstd Parquet (goal: 1.5x)
  status          `rsd-batch status` of the finished run in a new process (goal: 1 s)
Outputs are synthetic records in the real output schema (built with the runner's own code).
Goals on the 2-core CI machine: shard and merge <= 20 s each, resume scan <= 2 s.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rsd_batch.config import DatasetConfig, FieldsConfig
from rsd_batch.files import read_arrow, write_arrow, write_json
from rsd_batch.ledger import Ledger
from rsd_batch.merge import merge_run
from rsd_batch.methods import Result, Step
from rsd_batch.rundir import RUN_FILE, committed_keys, part_name, pending_work, result_paths
from rsd_batch.runner import _finish_shard, records_table, shard_ids
from rsd_batch.shards import read_shard, write_shards

NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["coins", "apples", "stickers", "marbles", "books", "shells"]


def write_problems(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(rows):
            who, item = rng.choice(NAMES), rng.choice(ITEMS)
            ops = " ".join(f"Then {who} {rng.choice(['buys', 'finds', 'wins'])} {rng.randint(2, 999)} "
                           f"more {item} and gives {rng.randint(1, 99)} to a friend." for _ in range(4))
            text = f"Problem {i}: {who} has {rng.randint(10, 999)} {item}. {ops} How many {item} now?"
            f.write(json.dumps({"id": f"p{i:07d}", "problem": text, "answer": str(rng.randint(0, 9999))})
                    + "\n")


def fake_results(shard: pa.Table, k: int) -> tuple[list[tuple[int, int]], list[Result]]:
    batch = [(row, 0) for row in range(k)]
    results = []
    for row in range(k):
        led = Ledger()
        led.target.prefill_tokens, led.target.generated_tokens = 120, 90
        led.target.prefill_flops, led.target.decode_flops, led.target.seconds = 10**9, 8 * 10**8, 0.5
        text = "Step one.\n\nStep two.\n\nThe answer is \\boxed{42}."
        results.append(Result(text, [Step("Step one.\n\n", "target"), Step("Step two.\n\n", "target"),
                                     Step("The answer is \\boxed{42}.", "target")], "eos", led))
    return batch, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=None, help="default: the dataset default (rows / 1000, >= 250)")
    ap.add_argument("--part-rows", type=int, default=64, help="samples per committed batch part")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rsd-bench-"))
    timings = []
    try:
        src = work / "problems.jsonl"
        t = time.perf_counter()
        write_problems(src, args.rows)
        print(f"wrote {args.rows:,} problems ({src.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t:.1f} s; timing starts now")

        run_dir = work / "run"
        cfg = DatasetConfig(name="synthetic", source=str(src), fields=FieldsConfig(id="id"),
                            shard_size=args.shard_size)
        from omegaconf import OmegaConf
        cfg = OmegaConf.structured(cfg)
        t = time.perf_counter()
        manifest = write_shards(cfg, run_dir)
        timings.append(("shard", args.rows, time.perf_counter() - t, 20.0))

        # A run whose samples are all committed as batch parts, none finalised yet.
        fp = "bench"
        write_json(run_dir / RUN_FILE, {"fingerprint": fp, "identity": {"method": {"n": 1, "name": "target_only"}},
                                        "shards_dir": str(run_dir.resolve()), "config": {}})
        template = None
        n_parts = 0
        for entry in manifest["shards"]:
            shard = read_shard(run_dir, manifest, entry["index"], verify=False)
            if template is None:
                template = records_table(shard.slice(0, args.part_rows), entry["index"],
                                         *fake_results(shard, args.part_rows), fp)
            out_cols = template.column_names[len(shard.column_names):]
            _, _, parts = result_paths(run_dir, entry["index"])
            for start in range(0, len(shard), args.part_rows):
                piece = shard.slice(start, args.part_rows)
                cols = template.select(out_cols).slice(0, len(piece))
                part = piece
                for name in out_cols:
                    part = part.append_column(template.schema.field(name), cols[name])
                part = part.set_column(part.column_names.index("shard"), template.schema.field("shard"),
                                       pa.array([entry["index"]] * len(piece), pa.int32()))
                write_arrow(parts / part_name(n_parts, len(piece)),
                            part.replace_schema_metadata(template.schema.metadata))
                n_parts += 1
        t = time.perf_counter()
        left = pending_work(run_dir, manifest, fp, 1, shard_ids(run_dir, manifest))
        timings.append((f"resume scan ({n_parts:,} parts)", args.rows, time.perf_counter() - t, 2.0))
        assert sum(left.values()) == 0 and len(left) == len(manifest["shards"])
        # Then `run` reads the committed ids of the shard it resumes, one shard at a time.
        _, _, parts0 = result_paths(run_dir, 0)
        t = time.perf_counter()
        keys = committed_keys(parts0, fp)
        timings.append(("committed ids of one shard in progress", len(keys), time.perf_counter() - t, 2.0))

        for entry in manifest["shards"]:
            final, done, parts = result_paths(run_dir, entry["index"])
            _finish_shard(parts, final, done, fp, entry["rows"])
        t = time.perf_counter()
        left = pending_work(run_dir, manifest, fp, 1, shard_ids(run_dir, manifest))
        timings.append((f"resume scan ({len(manifest['shards'])} done shards)", args.rows,
                        time.perf_counter() - t, 2.0))
        assert left == {}

        # The floor merge is held to (issue 15): read the result shards, concatenate, write zstd Parquet.
        t = time.perf_counter()
        finals = [result_paths(run_dir, e["index"])[0] for e in manifest["shards"]]
        anchor = pa.concat_tables([read_arrow(f) for f in finals])
        pq.write_table(anchor, work / "anchor.parquet", compression="zstd")
        anchor_s = time.perf_counter() - t
        timings.append(("merge anchor (read + concat + zstd Parquet)", args.rows, anchor_s, None))
        t = time.perf_counter()
        summary = merge_run(run_dir)
        merge_s = time.perf_counter() - t
        timings.append((f"merge ({merge_s / anchor_s:.2f}x the anchor; goal 1.5x)", args.rows, merge_s,
                        1.5 * anchor_s))
        assert summary["samples"] == args.rows
        # `rsd-batch status` of the finished run, as a user types it: a new process, imports included.
        t = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "rsd-batch"), "status", f"run.dir={run_dir}"],
                             capture_output=True, text=True, check=True).stdout
        timings.append(("rsd-batch status (new process)", args.rows, time.perf_counter() - t, 1.0))
        assert f"{len(manifest['shards'])} done" in out or "done" in out, out[-500:]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| step | rows | seconds | rows/s | goal (s) | met |\n|---|---:|---:|---:|---:|:-:|")
    for name, rows, secs, goal in timings:
        print(f"| {name} | {rows:,} | {secs:.2f} | {rows / secs:,.0f} | "
              + ("- | - |" if goal is None else f"{goal:.2f} | {'yes' if secs <= goal else 'NO'} |"))


if __name__ == "__main__":
    main()
