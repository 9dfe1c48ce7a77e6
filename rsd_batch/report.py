"""A sweep's report: every run folder under one root, as one table and one accuracy-vs-FLOPs plot.

    rsd-batch report runs/toy-sweep      ->  runs/toy-sweep/report.{md,json} and frontier.png

A run folder is any folder holding a run.json. One that finished but was not merged yet is merged
here (merged_summary: merge_run proves coverage first); one with shards still pending is listed as incomplete and
left out of the table, never half counted.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .config import method_label
from .errors import UserError
from .files import atomic_path, read_json, write_json
from .ledger import ROLES
from .rundir import RUN_FILE

log = logging.getLogger(__name__)


class ReportError(UserError, RuntimeError):
    pass


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (sane at 0%, 100% and small n, unlike p ± 2σ)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob(RUN_FILE)
                  if "logs" not in p.parent.relative_to(root).parts)


def load_point(run_dir: Path) -> dict:
    """One row of the report from a run folder (merging it first if it is done but unmerged)."""
    from .merge import MergeError, merged_summary

    info = read_json(run_dir / RUN_FILE)
    try:
        summary = merged_summary(run_dir)
    except MergeError as e:
        return {"run_dir": str(run_dir), "incomplete": str(e)}
    identity = info["identity"]
    n = summary["samples"]
    lo, hi = wilson_interval(summary["correct"], summary["graded"])
    roles = summary["roles"]
    return {
        "run_dir": str(run_dir),
        "label": method_label(identity["method"]),
        "method": identity["method"]["name"],
        "dataset": info["config"]["dataset"]["name"],
        "fingerprint": info["fingerprint"],
        "identity": identity,
        "samples": n,
        "graded": summary["graded"],
        "correct": summary["correct"],
        "accuracy": summary["accuracy"],
        "accuracy_ci95": [lo, hi] if summary["graded"] else None,
        "flops_per_sample": {r: roles[r]["mean"]["flops"] for r in ROLES} | {"total": summary["flops"]["mean"]},
        "generated_tokens_per_sample": {r: roles[r]["mean"]["generated_tokens"] for r in ROLES},
        "flops_vs_target_only": summary.get("flops_vs_target_only"),
        "model_seconds": sum(roles[r]["total"]["seconds"] for r in ROLES),
        "model_seconds_per_sample": sum(roles[r]["mean"]["seconds"] for r in ROLES),
        "latency_seconds_mean": summary.get("latency_seconds_mean"),
        "acceptance_steps": (summary.get("acceptance") or {}).get("steps"),
        "finish_reasons": summary["finish_reasons"],
    }


def _disambiguate(points: list[dict]) -> None:
    """Points with the same label differ elsewhere (temperature, models, prompt): say where."""
    by_label: dict[str, list[dict]] = {}
    for p in points:
        by_label.setdefault(p["label"], []).append(p)
    for same in by_label.values():
        if len(same) < 2:
            continue
        flats = [_flat(p["identity"]) for p in same]
        keys = sorted(k for k in set().union(*flats) if k != "shards"
                      and len({repr(f.get(k)) for f in flats}) > 1)
        # A model whose format differs is told by its format alone (prm.format=oracle), not its path and dtype.
        # (Its other keys may lie deeper: models.prm.content.files.<file> is the hash of each file.)
        keys = [k for k in keys if k.endswith(".format")
                or not (k.startswith("models.") and ".".join(k.split(".")[:2]) + ".format" in keys)]
        for p, f in zip(same, flats):
            extra = ", ".join(f"{k.split('.', 1)[-1] if k.startswith(('method.', 'models.')) else k}={f.get(k)}"
                              for k in keys[:3])
            p["label"] = f"{p['label']} ({extra or Path(p['run_dir']).name})"


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: how likely a split this uneven of the problems that only one of
    two runs solved is, if both runs were equally accurate (binomial, p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _correct_by_sample(run_dir: str) -> dict:
    import pyarrow.parquet as pq

    from .rundir import merged_path

    t = pq.read_table(merged_path(run_dir), columns=["id", "sample_index", "correct"])
    return {(i, k): c for i, k, c in zip(t["id"].to_pylist(), t["sample_index"].to_pylist(),
                                         t["correct"].to_pylist()) if c is not None}


def _compare_to_target_only(points: list[dict]) -> None:
    """Against a measured target_only run of the same dataset in the sweep, when there is one: the
    honest baseline (the ledger's target-only figure is an estimate from RSD's own output lengths),
    with a paired test on the samples both graded (the same problems, so McNemar, not two CIs)."""
    refs: dict[str, tuple[dict, dict]] = {}  # dataset -> (its target_only run, correct by sample)
    for q in points:
        if q["method"] == "target_only" and q["dataset"] not in refs:
            refs[q["dataset"]] = (q, _correct_by_sample(q["run_dir"]))
    for p in points:
        if p["dataset"] not in refs:
            p["vs_target_only_run"] = None
            continue
        ref, theirs = refs[p["dataset"]]
        mine = theirs if p is ref else _correct_by_sample(p["run_dir"])  # each file read once
        both = mine.keys() & theirs.keys()
        wins = sum(mine[k] and not theirs[k] for k in both)
        losses = sum(theirs[k] and not mine[k] for k in both)
        p["vs_target_only_run"] = {
            "run": ref["label"],
            "flops_ratio": ref["flops_per_sample"]["total"] / p["flops_per_sample"]["total"]
            if p["flops_per_sample"]["total"] else None,
            "accuracy_delta": None if p["accuracy"] is None or ref["accuracy"] is None
            else p["accuracy"] - ref["accuracy"],
            "paired_samples": len(both), "only_this_correct": wins, "only_target_correct": losses,
            "mcnemar_p": mcnemar_p(wins, losses)}


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both cost and accuracy, by increasing cost."""
    graded = sorted((p for p in points if p["accuracy"] is not None),
                    key=lambda p: (p["flops_per_sample"]["total"], -p["accuracy"]))
    front, best = [], -1.0
    for p in graded:
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def _pct(x) -> str:
    return "" if x is None else f"{x:.1%}"


def format_markdown(report: dict) -> str:
    pts = report["points"]
    lines = [f"# Sweep report: {report['root']}", "",
             f"{len(pts)} runs · dataset {', '.join(sorted({p['dataset'] for p in pts}))} · "
             "FLOPs are per sample (Kaplan 2N per token, see rsd_batch/ledger.py); 95% Wilson intervals; "
             "p: exact McNemar test against the target_only run on the same samples.", ""]
    head = ["run", "accuracy", "95% CI", "FLOPs/sample", "draft", "target", "prm",
            "FLOPs vs target_only run", "Δ accuracy", "vs target alone (ledger est.)",
            "model s/sample", "draft steps accepted", "finish reasons", "samples"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + ["---:"]) + "|"]
    front = {p["run_dir"] for p in pareto_front(pts)}
    for p in pts:
        f = p["flops_per_sample"]
        ci = p["accuracy_ci95"]
        ratio = p["flops_vs_target_only"]
        vs = p.get("vs_target_only_run") or {}
        lines.append("| " + " | ".join([
            p["label"] + (" ★" if p["run_dir"] in front else ""),
            _pct(p["accuracy"]),
            f"{ci[0]:.1%}–{ci[1]:.1%}" if ci else "",
            f"{f['total']:.3g}", f"{f['draft']:.3g}", f"{f['target']:.3g}", f"{f['prm']:.3g}",
            f"{vs['flops_ratio']:.2f}× fewer" if vs.get("flops_ratio") else "",
            f"{100 * vs['accuracy_delta']:+.1f} pt (p={vs['mcnemar_p']:.2g})"
            if vs.get("accuracy_delta") is not None and p["method"] != "target_only" else "",
            f"{ratio:.2f}× fewer" if ratio else "",
            f"{p['model_seconds_per_sample']:.3f}",
            _pct(p["acceptance_steps"]),
            ", ".join(f"{k} {v}" for k, v in sorted(p["finish_reasons"].items())),
            str(p["samples"]),
        ]) + " |")
    lines += ["", "★ on the accuracy-vs-FLOPs frontier (no other run is both cheaper and more accurate)."]
    if report.get("by"):
        lines += _by_table(report)
    if report["incomplete"]:
        lines += ["", "Not included (not finished):", ""]
        lines += [f"- `{i['run_dir']}`: {i['incomplete']}" for i in report["incomplete"]]
    lines += ["", "Run folders:", ""] + [f"- {p['label']}: `{p['run_dir']}`" for p in pts]
    return "\n".join(lines) + "\n"


def _label_points(fig, ax, pts: list[dict]) -> list:
    """Each point's label beside it, on the first side (right, or left near the right edge) and height
    that covers no label placed before and no point or error bar: runs of nearly equal cost and
    accuracy (δ sweeps) would otherwise print their labels on top of each other."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    placed = sorted(pts, key=lambda p: p["flops_per_sample"]["total"])
    xs = [math.log10(max(p["flops_per_sample"]["total"], 1.0)) for p in placed]
    span = max(xs[-1] - xs[0], 1e-9) if xs else 1.0
    boxes = []
    for p in placed:  # each point with its error bar, a few pixels wide
        (x0, y0), (x1, y1) = ax.transData.transform([(p["flops_per_sample"]["total"], 100 * ci)
                                                     for ci in p["accuracy_ci95"]])
        boxes.append(Bbox([[x0 - 8, min(y0, y1) - 6], [x1 + 8, max(y0, y1) + 6]]))
    # beside the point first, then further out, nearest first; a label moved away gets a leader line
    offsets = sorted(((dx, dy) for dx in (7, 30, 55) for dy in (5, -14, 15, -24, 25, -34, 35, -44)),
                     key=lambda o: math.hypot(o[0] - 7, o[1] - 5))
    for i, p in enumerate(placed):
        # left of the points near the right edge but the last (the margin leaves it room)
        left = (xs[i] - xs[0]) / span > 0.85 and i < len(placed) - 1
        for k, (dx, dy) in enumerate(offsets):
            label = ax.annotate(p["label"], (p["flops_per_sample"]["total"], 100 * p["accuracy"]),
                                textcoords="offset points", xytext=(-dx if left else dx, dy),
                                ha="right" if left else "left", va="center", fontsize=7,
                                arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if k else None)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone, not its leader line
            inside = (ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1
                      and ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1)
            if (inside and not any(box.overlaps(b) for b in boxes)) or k == len(offsets) - 1:
                break
            label.remove()
        boxes.append(box)
    return boxes[len(placed):]  # the labels' boxes, cheapest point first


def plot_frontier(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    pts = [p for p in report["points"] if p["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=150)
    colours = {"rsd": "tab:blue", "target_only": "tab:red", "draft_only": "tab:green", "sd": "tab:purple",
               "best_of_n": "tab:orange", "beam_search": "tab:brown"}
    for method in sorted({p["method"] for p in pts}):
        group = [p for p in pts if p["method"] == method]
        x = [p["flops_per_sample"]["total"] for p in group]
        y = [100 * p["accuracy"] for p in group]
        err = [[100 * (p["accuracy"] - p["accuracy_ci95"][0]) for p in group],
               [100 * (p["accuracy_ci95"][1] - p["accuracy"]) for p in group]]
        ax.errorbar(x, y, yerr=err, fmt="o", ms=6, capsize=3, color=colours.get(method, "tab:gray"),
                    label=method, zorder=3)
    front = pareto_front(pts)
    ax.plot([p["flops_per_sample"]["total"] for p in front], [100 * p["accuracy"] for p in front],
            "--", color="0.5", lw=1, zorder=2, label="frontier")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels collide on a short range
    ax.margins(x=0.16, y=0.08)
    ax.set_xlabel("FLOPs per sample (all models)")
    ax.set_ylabel("accuracy (%)")
    datasets = ", ".join(sorted({p["dataset"] for p in pts}))
    ax.set_title(f"Accuracy vs compute · {datasets} · {len(pts)} runs", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _label_points(fig, ax, pts)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def accuracy_by(run_dir: Path, key: str) -> dict:
    """Accuracy per value of one metadata field (MATH-500's `level` or `subject`, the toy's `num_ops`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .rundir import merged_path

    table = pq.read_table(merged_path(run_dir), columns=["metadata", "correct"])
    meta = table["metadata"].combine_chunks()
    names = [f.name for f in meta.type] if hasattr(meta.type, "__iter__") else []
    if key not in names:
        raise ReportError(f"by={key}: the merged data of {run_dir} has no metadata field {key!r}; "
                          f"it has {', '.join(names) or 'none'}.")
    values = pc.cast(meta.field(key), "string")
    out = {}
    for v, c in zip(values.to_pylist(), table["correct"].to_pylist()):
        d = out.setdefault("null" if v is None else v, {"graded": 0, "correct": 0})
        if c is not None:
            d["graded"] += 1
            d["correct"] += bool(c)
    for d in out.values():
        d["accuracy"] = d["correct"] / d["graded"] if d["graded"] else None
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def _by_table(report: dict) -> list[str]:
    key, pts = report["by"], report["points"]
    values = list(dict.fromkeys(v for p in pts for v in p["accuracy_by"]))
    lines = ["", f"Accuracy by `{key}` (samples graded in brackets):", "",
             "| run | " + " | ".join(f"{key}={v}" for v in values) + " |",
             "|---|" + "---:|" * len(values)]
    for p in pts:
        cells = []
        for v in values:
            d = p["accuracy_by"].get(v)
            cells.append("" if not d or d["accuracy"] is None else f"{d['accuracy']:.1%} ({d['graded']})")
        lines.append(f"| {p['label']} | " + " | ".join(cells) + " |")
    return lines


def build_report(root: Path, out: Path | None = None, by: str | None = None) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a folder; give the folder that holds the sweep's run folders.")
    runs = find_runs(root)
    if not runs:
        raise ReportError(f"no run folders (a folder with {RUN_FILE}) under {root}; run the sweep first, e.g. "
                          "`rsd-batch main -m run=sweep method.threshold=0.5,0.7` (-> runs/<dataset>-sweep/).")
    loaded = [load_point(r) for r in runs]
    points = [p for p in loaded if "incomplete" not in p]
    incomplete = [p for p in loaded if "incomplete" in p]
    if not points:
        raise ReportError(f"none of the {len(runs)} runs under {root} is finished: "
                          + "; ".join(i["incomplete"] for i in incomplete[:3]))
    if len({p["dataset"] for p in points}) > 1:  # one folder, several problem sets: say which is which
        for p in points:
            p["label"] = f"{p['dataset']}: {p['label']}"
    _disambiguate(points)
    _compare_to_target_only(points)
    points.sort(key=lambda p: (p["flops_per_sample"]["total"], p["label"]))
    if by:
        for p in points:
            p["accuracy_by"] = accuracy_by(Path(p["run_dir"]), by)
    report = {"root": str(root), "by": by, "points": points, "incomplete": incomplete,
              "frontier": [p["label"] for p in pareto_front(points)]}
    out = Path(out) if out else root
    files = {"markdown": out / "report.md", "json": out / "report.json", "plot": out / "frontier.png"}
    report["files"] = {k: str(v) for k, v in files.items()}
    with atomic_path(files["markdown"]) as tmp:
        tmp.write_text(format_markdown(report))
    write_json(files["json"], report)
    plot_frontier(report, files["plot"])
    return report
