"""Auto-δ: bisect RSD's threshold on a pilot subset until a cost or acceptance goal is met.

    rsd-batch calibrate calibrate.goal=flops calibrate.flops_ratio=0.4 calibrate.pilot=64
    rsd-batch calibrate calibrate.goal=acceptance calibrate.acceptance=0.8

Raising δ sends more steps to the target: cost goes up and acceptance goes down (the curve the
paper's Figure 4 sweeps). So the answer is the *largest* δ that still meets the goal: the most
target help the budget allows. Every probe is a real run folder under <calib dir>/delta-<δ> on the
same pilot shards, loaded models are shared between probes, and a probe already done is reused,
so an interrupted calibration resumes. The δ returned is always one that was measured to meet the goal.

Cost is the ledger's: RSD's FLOPs per sample over what the target alone would spend on the same
prompts and output lengths (`target_only_flops`, rsd_batch/ledger.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from . import rundir
from .config import CalibrateGoal
from .errors import UserError
from .files import write_json

log = logging.getLogger(__name__)


class CalibrateError(UserError, RuntimeError):
    pass


def calibrate_dir(cfg) -> Path:
    return Path(cfg.calibrate.dir) if cfg.calibrate.dir else rundir.run_dir(cfg) / "calibrate"


def _meets(cfg, probe: dict) -> bool:
    c = cfg.calibrate
    if c.goal == CalibrateGoal.flops:
        return probe["flops_ratio"] <= c.flops_ratio
    return probe["acceptance"] is not None and probe["acceptance"] >= c.acceptance


def _goal_text(cfg) -> str:
    c = cfg.calibrate
    if c.goal == CalibrateGoal.flops:
        return f"FLOPs per sample <= {c.flops_ratio:g} x target-only"
    return f"draft steps accepted >= {c.acceptance:.0%}"


def calibrate(cfg) -> dict:
    from .merge import merged_summary
    from .runner import run
    from .shards import write_shards

    c = cfg.calibrate
    if str(cfg.method.name) != "rsd":
        raise CalibrateError(f"calibrate tunes RSD's threshold; method={cfg.method.name} has none. "
                             "Use method=rsd (the default).")
    if not 0 <= c.low < c.high:
        raise CalibrateError(f"calibrate.low={c.low} and calibrate.high={c.high}: need 0 <= low < high.")
    root = calibrate_dir(cfg)
    pilot_dir = root / "pilot"
    dataset = OmegaConf.merge(cfg.dataset, {"limit": c.pilot})
    write_shards(dataset, pilot_dir, fresh=cfg.run.fresh)
    models: dict = {}
    probes: dict[float, dict] = {}

    def probe(delta: float) -> dict:
        delta = round(delta, 6)
        if delta in probes:
            return probes[delta]
        point = OmegaConf.merge(cfg, {"method": {"threshold": delta},
                                      "run": {"dir": str(root / f"delta-{delta:.4f}"),
                                              "shards_from": str(pilot_dir)}})
        run(point, models=models)  # loads the models into `models` on the first probe only
        s = merged_summary(Path(point.run.dir))  # a probe merged before is not merged again
        ratio = 1 / s["flops_vs_target_only"] if s.get("flops_vs_target_only") else float("inf")
        probes[delta] = {"delta": delta, "run_dir": point.run.dir, "accuracy": s["accuracy"],
                         "flops_ratio": ratio, "flops_per_sample": s["flops"]["mean"],
                         "acceptance": s["acceptance"]["steps"], "samples": s["samples"]}
        probes[delta]["meets_goal"] = _meets(cfg, probes[delta])
        log.info("δ=%.4f: accuracy %s, FLOPs %.3f x target-only, acceptance %s -> %s", delta,
                 s["accuracy"], ratio, s["acceptance"]["steps"], "meets" if probes[delta]["meets_goal"] else "misses")
        return probes[delta]

    best = probe(c.high)
    if not best["meets_goal"]:  # bisect [low, high], keeping `best` the highest δ measured to meet it
        best, lo, hi = probe(c.low), c.low, c.high
        for _ in range(c.iterations if best["meets_goal"] else 0):
            mid = (lo + hi) / 2
            point = probe(mid)
            if point["meets_goal"]:
                lo, best = mid, point
            else:
                hi = mid
    found = best["meets_goal"]
    result = {"goal": _goal_text(cfg), "pilot_problems": c.pilot, "dir": str(root),
              "probes": sorted(probes.values(), key=lambda p: p["delta"]), "delta": None}
    if found:
        result.update({k: best[k] for k in ("delta", "accuracy", "flops_ratio", "acceptance")})
    write_json(root / "calibrate.json", result)
    if not found:  # `best` is then the δ=low probe: the cheapest, most accepting point
        raise CalibrateError(
            f"no δ in [{c.low:g}, {c.high:g}] meets the goal ({_goal_text(cfg)}): even δ={c.low:g} gives "
            f"{_describe(best)}. Loosen the goal or use a cheaper draft/PRM. "
            f"Probes: {root / 'calibrate.json'}")
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _describe(p: dict) -> str:
    return (f"accuracy {_pct(p['accuracy'])}, FLOPs {p['flops_ratio']:.3f}× target-only, "
            f"draft steps accepted {_pct(p['acceptance'])}")


def format_calibration(result: dict) -> str:
    lines = [f"goal: {result['goal']} · pilot: first {result['pilot_problems']} problems", "",
             "| δ | accuracy | FLOPs vs target-only | draft steps accepted | meets goal |",
             "|---:|---:|---:|---:|:---:|"]
    for p in result["probes"]:
        lines.append(f"| {p['delta']:.4f} | {_pct(p['accuracy'])} | {p['flops_ratio']:.3f}× | "
                     f"{_pct(p['acceptance'])} | {'yes' if p['meets_goal'] else 'no'} |")
    lines += ["", f"use method.threshold={result['delta']:.4f}  ({_describe(result)} on the pilot)",
              f"probes and their run folders: {result['dir']}"]
    return "\n".join(lines)
