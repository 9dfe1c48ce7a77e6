"""Evaluation and data generation on the toy world, through the commands a user types:
a Hydra `-m` sweep -> `rsd-batch report`, `rsd-batch calibrate`, `rsd-batch export`, live progress."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import cli

PILOT = 10  # problems per run: enough for every method to differ, small enough for a 2-core CI
TOY = [f"dataset.limit={PILOT}", "run.progress=false", "run.batch_size=8"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A δ sweep plus both baselines on the shipped toy models, into one sweep folder (`run=sweep`
    names each point's folder: runs/toy_arith-sweep/rsd-d0.5, .../target_only, ...)."""
    cwd = tmp_path_factory.mktemp("work")
    cli("main", "-m", *TOY, "run=sweep", "method=rsd", "method.threshold=0.5,0.99", cwd=cwd)
    cli("main", "-m", *TOY, "run=sweep", "method=target_only,draft_only", cwd=cwd)
    root = cwd / "runs" / "toy_arith-sweep"
    assert sorted(p.name for p in root.iterdir()) == ["draft_only", "rsd-d0.5", "rsd-d0.99", "target_only"]
    return root


def _merged(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "merged" / "data.parquet").to_pylist()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_report_gathers_the_sweep(sweep, tmp_path):
    # A finished run that was never merged is merged by the report; an unfinished one is listed apart.
    cli("run", *TOY, "method=draft_only", "method.temperature=0.7", f"run.dir={sweep}/draft-t0.7",
        f"run.shards_from={sweep}/draft_only")
    cli("shard", *TOY, f"run.dir={sweep}/unfinished")
    (sweep / "unfinished" / "run.json").write_text((sweep / "draft_only" / "run.json").read_text()
                                                   .replace(str(sweep / "draft_only"), str(sweep / "unfinished")))
    out = cli("report", str(sweep)).stdout
    rep = json.loads((sweep / "report.json").read_text())
    labels = sorted(p["label"] for p in rep["points"])
    # Two draft_only points differ in temperature: the label says so.
    assert labels == sorted(["rsd δ=0.5", "rsd δ=0.99", "target_only", "draft_only (temperature=0.0)",
                             "draft_only (temperature=0.7)"]), labels
    assert [Path(i["run_dir"]).name for i in rep["incomplete"]] == ["unfinished"]
    assert (sweep / "draft-t0.7" / "merged" / "data.parquet").exists()

    for p in rep["points"]:
        rows = _merged(Path(p["run_dir"]))
        assert p["samples"] == len(rows) == PILOT
        graded = [r["correct"] for r in rows if r["correct"] is not None]
        assert p["accuracy"] == pytest.approx(sum(graded) / len(graded))
        for role in ("draft", "target", "prm"):
            assert p["flops_per_sample"][role] == pytest.approx(sum(r["ledger"][role]["flops"] for r in rows) / PILOT)
        assert p["flops_per_sample"]["total"] == pytest.approx(sum(r["ledger"]["flops"] for r in rows) / PILOT)
        lo, hi = p["accuracy_ci95"]
        assert lo <= p["accuracy"] <= hi
        assert sum(p["finish_reasons"].values()) == PILOT
        decided = [s["accepted"] for r in rows for s in r["steps"] if s["accepted"] is not None]
        assert p["acceptance_steps"] == (pytest.approx(sum(decided) / len(decided)) if decided else None)
        assert f"| {p['label']}" in out  # one Markdown row per point
    by = {p["label"]: p for p in rep["points"]}
    # Baselines use one model; RSD costs grow with δ (more target rewrites, fewer kept draft steps). On the
    # pilot the shipped PRM scores every draft step 0.91 or more, so δ=0.5 and 0.9 decide alike: 0.99 differs.
    assert by["target_only"]["flops_per_sample"]["draft"] == 0 == by["target_only"]["flops_per_sample"]["prm"]
    assert by["draft_only (temperature=0.0)"]["flops_per_sample"]["target"] == 0
    assert by["rsd δ=0.5"]["flops_per_sample"]["total"] < by["rsd δ=0.99"]["flops_per_sample"]["total"]
    assert by["rsd δ=0.5"]["acceptance_steps"] > by["rsd δ=0.99"]["acceptance_steps"]
    ref = by["target_only"]["flops_per_sample"]["total"]
    assert by["rsd δ=0.5"]["vs_target_only_run"]["flops_ratio"] == pytest.approx(
        ref / by["rsd δ=0.5"]["flops_per_sample"]["total"])
    # The paired test against the target_only run: counts from the merged rows, p from scipy.
    from scipy.stats import binomtest

    target_rows = {(r["id"], r["sample_index"]): r["correct"] for r in _merged(sweep / "target_only")}
    for p in rep["points"]:
        mine = {(r["id"], r["sample_index"]): r["correct"] for r in _merged(Path(p["run_dir"]))}
        wins = sum(mine[k] and not target_rows[k] for k in mine)
        losses = sum(target_rows[k] and not mine[k] for k in mine)
        vs = p["vs_target_only_run"]
        assert (vs["paired_samples"], vs["only_this_correct"], vs["only_target_correct"]) == (PILOT, wins, losses)
        expected = binomtest(min(wins, losses), wins + losses, 0.5).pvalue if wins + losses else 1.0
        assert vs["mcnemar_p"] == pytest.approx(expected)
    # The frontier: nothing is cheaper-or-equal and more accurate than a point on it; every point
    # off it has one on it that is cheaper-or-equal and at least as accurate.
    front = [by[label] for label in rep["frontier"]]
    cost = {p["label"]: p["flops_per_sample"]["total"] for p in rep["points"]}
    for p in rep["points"]:
        if p in front:
            assert not any(cost[q["label"]] <= cost[p["label"]] and q["accuracy"] > p["accuracy"]
                           for q in rep["points"]), p["label"]
        else:
            assert any(cost[q["label"]] <= cost[p["label"]] and q["accuracy"] >= p["accuracy"]
                       for q in front), p["label"]
    md = (sweep / "report.md").read_text()
    assert md.count("\n| ") == 1 + len(rep["points"]) and "unfinished" in md
    w, h = _png_size(sweep / "frontier.png")
    assert (w, h) == (1050, 720)  # 7 x 4.8 inches at 150 dpi

    # Accuracy by a metadata field, written elsewhere (out=).
    cli("report", str(sweep), "by=num_ops", f"out={tmp_path}")
    by_rep = json.loads((tmp_path / "report.json").read_text())
    for p in by_rep["points"]:
        rows = _merged(Path(p["run_dir"]))
        for ops in {r["metadata"]["num_ops"] for r in rows}:
            group = [r["correct"] for r in rows if r["metadata"]["num_ops"] == ops]
            assert p["accuracy_by"][str(ops)] == {"graded": len(group), "correct": sum(group),
                                                  "accuracy": pytest.approx(sum(group) / len(group))}
    assert "Accuracy by `num_ops`" in (tmp_path / "report.md").read_text()
    bad = cli("report", str(sweep), "by=level", f"out={tmp_path}", check=False)
    assert bad.returncode == 2 and "no metadata field 'level'" in bad.stderr


def test_report_errors_name_the_folder(tmp_path):
    usage = cli("report", check=False)
    assert usage.returncode == 2 and "usage: rsd-batch report <sweep folder>" in usage.stderr
    missing = cli("report", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
    empty = cli("report", str(tmp_path), check=False)
    assert empty.returncode == 2 and "no run folders" in empty.stderr


def _probe_rows(result: dict) -> dict[float, dict]:
    return {p["delta"]: p for p in result["probes"]}


def test_calibrate_finds_the_largest_delta_within_a_flops_budget(tmp_path):
    args = [*TOY, f"run.dir={tmp_path}/cal", "calibrate.pilot=8", "calibrate.iterations=3",
            "calibrate.goal=flops", "calibrate.flops_ratio=0.6"]
    out = cli("calibrate", *args).stdout
    result = json.loads((tmp_path / "cal" / "calibrate" / "calibrate.json").read_text())
    probes = _probe_rows(result)
    best = result["delta"]
    assert f"use method.threshold={best:.4f}" in out
    assert probes[best]["meets_goal"] and probes[best]["flops_ratio"] <= 0.6
    # Bisection: the δ just above the answer was probed and misses, within (1-0)/2^3 of it.
    above = min(d for d in probes if d > best)
    assert not probes[above]["meets_goal"] and above - best <= 1 / 8 + 1e-9
    assert len(probes) == 2 + 3  # both ends, then three halvings
    for d, p in probes.items():
        s = json.loads((Path(p["run_dir"]) / "summary.json").read_text())
        assert s["samples"] == 8 and math.isclose(p["flops_ratio"], 1 / s["flops_vs_target_only"])
        assert json.loads((Path(p["run_dir"]) / "run.json").read_text())["identity"]["method"]["threshold"] == d
    # Every probe reads the one set of pilot shards.
    assert {json.loads((Path(p["run_dir"]) / "run.json").read_text())["shards_dir"] for p in probes.values()} \
        == {str((tmp_path / "cal" / "calibrate" / "pilot").resolve())}
    # Again: every probe is reused (nothing re-run), same answer.
    parts = {p: sorted(Path(p).rglob("*.arrow")) for p in (v["run_dir"] for v in probes.values())}
    mtimes = {f: f.stat().st_mtime_ns for fs in parts.values() for f in fs}
    cli("calibrate", *args)
    again = json.loads((tmp_path / "cal" / "calibrate" / "calibrate.json").read_text())
    assert again["delta"] == best and again["probes"] == result["probes"]
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes


def test_calibrate_acceptance_goal_and_impossible_goal(tmp_path):
    args = [*TOY, "calibrate.pilot=8", "calibrate.iterations=2", "calibrate.goal=acceptance"]
    cli("calibrate", *args, "calibrate.acceptance=0.9", f"run.dir={tmp_path}/a")
    result = json.loads((tmp_path / "a" / "calibrate" / "calibrate.json").read_text())
    best = _probe_rows(result)[result["delta"]]
    assert best["acceptance"] >= 0.9
    assert all(not p["meets_goal"] for d, p in _probe_rows(result).items() if d > result["delta"])
    impossible = cli("calibrate", *TOY, "calibrate.pilot=8", "calibrate.goal=flops", "calibrate.flops_ratio=0.0001",
                     f"run.dir={tmp_path}/b", check=False)
    assert impossible.returncode == 2 and "no δ in [0, 1] meets the goal" in impossible.stderr
    wrong = cli("calibrate", *TOY, "method=sd", f"run.dir={tmp_path}/c", check=False)
    assert wrong.returncode == 2 and "method=rsd" in wrong.stderr


def test_export_sft_layout_and_filters(sweep, tmp_path):
    from datasets import load_dataset

    run = sweep / "rsd-d0.5"
    rows = _merged(run)
    out = tmp_path / "sft"
    printed = cli("export", str(run), f"out={out}", "correct_only=true", "finish_reasons=[eos]").stdout
    expected = [r for r in rows if r["correct"] and r["finish_reason"] == "eos" and r["error"] is None]
    ds = load_dataset(str(out))["train"]
    assert len(ds) == len(expected) > 0 and f"exported {len(expected)} of {PILOT}" in printed
    system = json.loads((run / "run.json").read_text())["config"]["prompt"]
    for got, want in zip(ds, expected):
        assert got["id"] == want["id"] and got["correct"] is True
        assert got["messages"][-1] == {"role": "assistant", "content": want["output"]}
        assert got["messages"][-2] == {"role": "user",
                                       "content": system["template"].replace("{problem}", want["problem"])}
    meta = json.loads((out / "export.json").read_text())
    assert meta["kept_after_each_filter"] == {"merged samples": PILOT, "no error": PILOT,
                                              "correct": sum(bool(r["correct"]) for r in rows),
                                              "finish_reason in ['eos']": len(expected)}
    again = cli("export", str(run), f"out={out}", check=False)
    assert again.returncode == 2 and "fresh=true" in again.stderr
    unmerged = cli("export", str(sweep / "unmerged-does-not-exist"), check=False)
    assert unmerged.returncode == 2 and "not a run folder" in unmerged.stderr


def test_export_prm_layout_step_filters(sweep, tmp_path):
    from datasets import load_dataset

    run = sweep / "rsd-d0.5"
    rows = _merged(run)

    def share(r):
        return sum(s["source"] == "draft" for s in r["steps"]) / len(r["steps"])

    def low(r):
        scored = [s["reward"] for s in r["steps"] if s["reward"] is not None]
        return min(scored) if scored else None

    out = tmp_path / "prm"
    cli("export", str(run), f"out={out}", "layout=prm", "min_step_reward=0.6", "min_draft_share=0.5",
        "label_threshold=0.8")
    expected = [r for r in rows if low(r) is not None and low(r) >= 0.6 and share(r) >= 0.5]
    ds = load_dataset(str(out))["train"]
    assert [d["id"] for d in ds] == [r["id"] for r in expected] and len(ds) > 0
    for got, want in zip(ds, expected):
        assert got["completions"] == [s["text"] for s in want["steps"]]
        assert "".join(got["completions"]) == want["output"]
        assert got["sources"] == [s["source"] for s in want["steps"]]
        assert got["rewards"] == pytest.approx([s["reward"] for s in want["steps"]])
        assert got["labels"] == [None if s["reward"] is None else s["reward"] >= 0.8 for s in want["steps"]]
        assert got["draft_share"] == pytest.approx(share(want)) and got["min_reward"] == pytest.approx(low(want))
        assert got["rejected"] == [{"step": i, "text": s["rejected_text"], "reward": pytest.approx(s["rejected_reward"])}
                                   for i, s in enumerate(want["steps"]) if s["rejected_text"] is not None]
        assert want["problem"] in got["prompt"]
    # Target steps carry no reward and no label; the rejected draft step they replaced does.
    assert any(None in d["labels"] for d in ds) or all(s == "draft" for d in ds for s in d["sources"])
    # draft share filters on a target_only run: nothing is written by the draft.
    none = cli("export", str(sweep / "target_only"), f"out={tmp_path / 'none'}", "min_draft_share=0.01").stdout
    assert "exported 0 of" in none


def test_progress_line_in_the_log_off_a_terminal(tmp_path):
    proc = cli("main", "dataset.limit=6", "run.batch_size=2", "run.progress=true", "run.progress_every_s=0",
               f"run.dir={tmp_path}/run")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "samples/s" in line]
    assert len(lines) >= 3, proc.stdout[-2000:] + proc.stderr[-2000:]  # one per committed batch, plus the final tally
    assert "6/6 samples" in lines[-1] and "ETA 0 s" in lines[-1]
    assert "accepted" in lines[-1] and "fewer than target" in lines[-1]
    logs = list((tmp_path / "run" / "logs").rglob("*.log"))
    assert any("samples/s" in p.read_text() for p in logs)  # the same line in the run's log file


@pytest.mark.parametrize("a,b", [(0, 0), (0, 5), (3, 9), (40, 41), (2, 120)])
def test_mcnemar_matches_scipy(a, b):
    from scipy.stats import binomtest

    from rsd_batch.report import mcnemar_p

    assert mcnemar_p(a, b) == pytest.approx(binomtest(min(a, b), a + b, 0.5).pvalue if a + b else 1.0)
    assert mcnemar_p(a, b) == mcnemar_p(b, a)


def test_runs_told_apart_by_a_model_format_not_its_file_hashes():
    """Two RSD δ=0.7 runs, one with the learned PRM and one with the oracle: the report names them by
    prm.format, however deep the PRM's other identity keys lie (the hash of each of its files)."""
    from rsd_batch.report import _disambiguate

    def point(fmt, files):
        return {"label": "rsd δ=0.7", "run_dir": f"runs/x/{fmt}",
                "identity": {"method": {"name": "rsd", "threshold": 0.7},
                             "models": {"prm": {"format": fmt, "path": None if fmt == "oracle" else "models/toy/prm",
                                                "content": {"files": files}}}}}

    points = [point("math_shepherd", {"config.json": "591f", "model.safetensors": "e8ca"}),
              point("oracle", {"config.json": None, "model.safetensors": None})]
    _disambiguate(points)
    assert [p["label"] for p in points] == ["rsd δ=0.7 (prm.format=math_shepherd)", "rsd δ=0.7 (prm.format=oracle)"]


def test_frontier_labels_of_coinciding_points_do_not_overlap():
    """A δ sweep puts several runs at nearly the same cost and accuracy: each label finds a place of
    its own, inside the axes and clear of the other labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsd_batch.report import _label_points

    def point(label, flops, acc):
        return {"label": label, "flops_per_sample": {"total": flops}, "accuracy": acc,
                "accuracy_ci95": [acc - 0.015, min(1.0, acc + 0.006)]}

    pts = [point("draft_only", 5e7, 0.87), point("target_only", 1.1e9, 0.988)]
    pts += [point(f"rsd δ={d}", 2.9e8 + 1e6 * i, 0.986 + 0.001 * i) for i, d in enumerate((0.3, 0.5, 0.7, 0.9))]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=150)
    ax.errorbar([p["flops_per_sample"]["total"] for p in pts], [100 * p["accuracy"] for p in pts], fmt="o")
    ax.set_xscale("log")
    ax.margins(x=0.16, y=0.08)
    fig.tight_layout()
    boxes = _label_points(fig, ax, pts)
    texts = [t.get_text() for t in ax.texts]
    plt.close(fig)
    assert sorted(texts) == sorted(p["label"] for p in pts)
    assert len(boxes) == len(pts)
    for i, a in enumerate(boxes):
        assert ax.bbox.x0 <= a.x0 and a.x1 <= ax.bbox.x1 and ax.bbox.y0 <= a.y0 and a.y1 <= ax.bbox.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), texts
