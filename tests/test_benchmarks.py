"""The benchmark scripts run and print sane tables (timings themselves are never asserted)."""
from __future__ import annotations

import subprocess
import sys

from rsd_batch.config import ROOT


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| step")]


def test_gpu_benchmark_runs_scaled_down_on_the_cpu():
    # Its default size (batch 64, 8 steps of 32 tokens after 256), only the shapes scaled down: the
    # 7B-shaped target's extra vocabulary rows once made the draft crash here.
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--device", "cpu", "--scale", "16"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[0]: r for r in table_rows(proc.stdout)}
    assert list(rows) == ["target_only", "rsd, 0% accepted", "rsd, 50% accepted", "rsd, 90% accepted"]
    assert rows["rsd, 0% accepted"][1] == "0%"  # ω = 0 accepts nothing
    assert rows["target_only"][7] != "-" and rows["target_only"][5] == "-"  # target only, no draft
    assert all(float(r[3].replace(",", "")) > 0 for r in rows.values())  # output tok/s (never timed here)
    # A property of the numbers: the acceptance each row measures is the one it set (ω constant),
    # over 64 x 8 draws
    measured = {k: int(r[1].rstrip("%")) for k, r in rows.items() if r[1]}
    assert measured["rsd, 0% accepted"] == 0 and 35 <= measured["rsd, 50% accepted"] <= 65
    assert 80 <= measured["rsd, 90% accepted"] <= 98


def test_foundation_benchmark_small():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_foundation.py"), "--rows", "3000",
                           "--shard-size", "500", "--part-rows", "50"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = table_rows(proc.stdout)
    names = [r[0] for r in rows]
    assert names[:2] == ["shard", "resume scan (60 parts)"] and names[-1] == "rsd-batch status (new process)"
    assert "merge anchor (read + concat + zstd Parquet)" in names
    assert any(n.startswith("merge (") and n.endswith("x the anchor; goal 1.5x)") for n in names)
    assert all(r[1].replace(",", "").isdigit() for r in rows)


def test_shard_benchmark_small():
    """Every contender reads the same rows; the shard row and the one-blank-line row count one fewer."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_shard.py"), "--rows", "20000"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[1]: r for r in table_rows(proc.stdout) if r[0] == "20,000"}
    assert list(rows) == ["rsd-batch shard", "pyarrow", "datasets", "rsd-batch shard, one blank line"]
    assert rows["rsd-batch shard"][2] == rows["datasets"][2] == "80"  # 20,000 / 250 rows a shard
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows.values())
