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

from .config import CalibrateGoal
from .files import write_json

log = logging.getLogger(__name__)


class CalibrateError(RuntimeError):
    pass


def calibrate_dir(cfg) -> Path:
    return Path(cfg.calibrate.dir) if cfg.calibrate.dir else Path(cfg.run.dir) / "calibrate"


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
    from .merge import merge_run
    from .problems import load_problems
    from .runner import load_models, run
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
    write_shards(load_problems(dataset), dataset, pilot_dir, fresh=cfg.run.fresh)
    models: dict = {}
    probes: dict[float, dict] = {}

    def probe(delta: float) -> dict:
        delta = round(delta, 6)
        if delta in probes:
            return probes[delta]
        point = OmegaConf.merge(cfg, {"method": {"threshold": delta},
                                      "run": {"dir": str(root / f"delta-{delta:.4f}"),
                                              "shards_from": str(pilot_dir)}})
        if not models:
            from .methods import get_method
            models.update(load_models(point, get_method("rsd").roles(point.method)))
        run(point, models=models)
        s = merge_run(Path(point.run.dir))
        ratio = 1 / s["flops_vs_target_only"] if s.get("flops_vs_target_only") else float("inf")
        probes[delta] = {"delta": delta, "run_dir": point.run.dir, "accuracy": s["accuracy"],
                         "flops_ratio": ratio, "flops_per_sample": s["flops"]["mean"],
                         "acceptance": s["acceptance"]["steps"], "samples": s["samples"]}
        probes[delta]["meets_goal"] = _meets(cfg, probes[delta])
        log.info("δ=%.4f: accuracy %s, FLOPs %.3f x target-only, acceptance %s -> %s", delta,
                 s["accuracy"], ratio, s["acceptance"]["steps"], "meets" if probes[delta]["meets_goal"] else "misses")
        return probes[delta]

    lo, hi = c.low, c.high
    best = None
    if probe(hi)["meets_goal"]:
        best = probes[round(hi, 6)]
    elif probe(lo)["meets_goal"]:
        best = probes[round(lo, 6)]
        for _ in range(c.iterations):
            mid = (lo + hi) / 2
            if probe(mid)["meets_goal"]:
                lo, best = mid, probes[round(mid, 6)]
            else:
                hi = mid
    result = {"goal": _goal_text(cfg), "pilot_problems": c.pilot, "dir": str(root),
              "probes": sorted(probes.values(), key=lambda p: p["delta"]), "delta": None}
    if best is not None:
        result.update({"delta": best["delta"], "accuracy": best["accuracy"], "flops_ratio": best["flops_ratio"],
                       "acceptance": best["acceptance"]})
    write_json(root / "calibrate.json", result)
    if best is None:
        raise CalibrateError(
            f"no δ in [{c.low:g}, {c.high:g}] meets the goal ({_goal_text(cfg)}): even δ={c.low:g} gives "
            f"{_describe(probes[round(c.low, 6)])}. Loosen the goal or use a cheaper draft/PRM. "
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
