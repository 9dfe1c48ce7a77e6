"""`rsd-batch run run.dry_run=true`: what a run would do, and what it would cost, with nothing
submitted or written: the shards to run and those skipped, tokens and FLOPs per role (from a pilot's
summary, or an upper bound from method.max_new_tokens), and for SLURM the arrays and the sbatch script."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig

from .. import rundir
from ..files import read_json
from .scheduler import LaunchError, max_array_size, sbatch_available
from .submit import method_roles, run_state, sbatch_parameters, split_arrays, task_groups
from .view import SchedulerView, job_list, ranges


def dry_run(cfg: DictConfig) -> dict:
    """Print what `rsd-batch run` would do, submit and write nothing."""
    st = run_state(cfg, claim=False)
    view = SchedulerView.of(cfg)
    busy = view.busy(strict=False)
    todo = [i for i in sorted(st.pending) if i not in busy]
    n_shards = len(st.manifest["shards"])
    samples = sum(st.pending[i] for i in todo)
    lines = [f"dry run (nothing is submitted or written): launcher={cfg.launcher.name}, method={st.method.name}, "
             f"run {st.run_dir} (fingerprint {st.fp})",
             f"shards: {len(todo)} to run ({ranges(todo) or 'none'}), {n_shards - len(st.pending)} done "
             "(skipped)" + (f", {len(busy)} queued or running in {job_list(busy.values())} (skipped)"
                            if busy else ""),
             f"samples: {samples} to run (method.n={cfg.method.n}) of "
             f"{sum(s['rows'] for s in st.manifest['shards']) * cfg.method.n}"]
    estimate = estimate_cost(cfg, method_roles(st.method, cfg), st.manifest, todo, samples)
    lines.append(estimate["text"])
    plan: dict[str, Any] = {"run_dir": str(st.run_dir), "fingerprint": st.fp, "to_run": todo,
                            "done": n_shards - len(st.pending), "busy": busy, "samples": samples,
                            "estimate": estimate}
    if str(cfg.launcher.name) == "slurm":
        lines += _slurm_plan(cfg, todo, plan, view.folder)
    print("\n".join(lines))
    return {"plan": plan}


def _slurm_plan(cfg: DictConfig, todo: list[int], plan: dict, folder: Path) -> list[str]:
    groups = task_groups(cfg, todo)
    per = max(1, int(cfg.launcher.shards_per_task))
    max_size = max_array_size() if sbatch_available() else None
    arrays = split_arrays(groups, max_size, int(cfg.launcher.array_parallelism))
    plan["arrays"] = [{"tasks": len(c), "throttle": t} for c, t in arrays]
    lc = cfg.launcher
    lines = [
        f"slurm: {len(groups)} tasks ({per} shard{'s' if per > 1 else ''} each) in {len(arrays)} "
        f"array{'s' if len(arrays) != 1 else ''} (MaxArraySize "
        f"{max_size if max_size else 'unknown here: no split assumed'})"
        + "".join(f"; array {k}: {len(c)} tasks, at most {t} at once" for k, (c, t) in enumerate(arrays))
        + f"\n  per task: {lc.gpus_per_task} GPU, {lc.cpus_per_task} CPUs"
        + (f", {lc.mem_gb} GB" if lc.mem_gb else "") + f", {lc.timeout_min} min, warning "
        f"{lc.signal_delay_s} s before the limit; requeues: {lc.max_timeouts} timeouts, "
        f"{lc.max_preemptions} preemptions"
        + ("\n  then the merge as a job after them (afterok)" if lc.merge_after else "")]
    if arrays:
        script = sbatch_script(cfg, len(arrays[0][0]), arrays[0][1], folder / "<submission>")
        plan["sbatch"] = script
        lines.append("sbatch script of the first array, as submitit would submit it:\n" + script)
    return lines


def sbatch_script(cfg: DictConfig, n_tasks: int, throttle: int, folder: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, f"rsd-{rundir.run_dir(cfg).name}")
    params["array_parallelism"] = throttle
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=n_tasks if n_tasks > 1 else None, **params)


def estimate_cost(cfg: DictConfig, roles: Iterable[str], manifest: dict, todo: list[int],
                  samples: int) -> dict:
    """Tokens and FLOPs per role for the samples to run: from a pilot's summary.json (means per
    sample) when launcher.pilot names one, else an upper bound from method.max_new_tokens with the
    prompts' real token counts (a sample of them) and the models' sizes from their configs."""
    roles = list(roles)
    pilot = cfg.launcher.pilot
    if pilot:
        path = Path(pilot)
        path = path / rundir.SUMMARY_FILE if path.is_dir() else path
        if not path.exists():
            raise LaunchError(f"launcher.pilot={pilot!r}: no summary.json there; merge the pilot run "
                              "first (rsd-batch main dataset.limit=... run.dir=<pilot>).")
        summary = read_json(path)
        per_role = {}
        for role in roles:
            mean = summary["roles"][role]["mean"]
            per_role[role] = {k: mean[k] * samples for k in
                              ("prefill_tokens", "decode_tokens", "generated_tokens", "flops", "seconds")}
        note = (f"estimated cost from the pilot {path} ({summary['samples']} samples, method "
                f"{summary.get('method')}) × {samples} samples")
        if summary.get("method") != str(cfg.method.name):
            note += f" — warning: the pilot ran {summary.get('method')}, not {cfg.method.name}"
        source = "pilot"
    else:
        per_role = _estimate_from_max_tokens(cfg, roles, manifest, todo, samples)
        note = (f"estimated cost (no launcher.pilot): upper bound, every sample generating "
                f"method.max_new_tokens={cfg.method.max_new_tokens} tokens after its prompt, once "
                "per model (methods that write several candidates cost more: a pilot measures it)")
        source = "max_new_tokens"
    rows = [note, f"  {'role':<7} {'prefill tok':>14} {'decode tok':>14} {'FLOPs':>12}"
            + (f" {'seconds':>10}" if source == "pilot" else "")]
    for role, d in per_role.items():
        rows.append(f"  {role:<7} {d['prefill_tokens']:>14,.0f} {d['decode_tokens']:>14,.0f} "
                    f"{d['flops']:>12.3e}" + (f" {d['seconds']:>10.1f}" if source == "pilot" else ""))
    total = sum(d["flops"] for d in per_role.values())
    rows.append(f"  {'all':<7} {'':>14} {'':>14} {total:>12.3e}")
    return {"source": source, "roles": per_role, "flops": total, "text": "\n".join(rows)}


def _estimate_from_max_tokens(cfg, roles, manifest, todo, samples, sample_size: int = 256) -> dict:
    from transformers import AutoConfig

    from ..ledger import CostModel
    from ..models import ModelLoadError, load_tokenizer, render_prompt
    from ..shards import read_shard

    problems: list[str] = []
    for i in todo:
        if len(problems) >= sample_size:
            break
        problems += read_shard(rundir.shards_dir(cfg), manifest, i, verify=False)["problem"].to_pylist()
    problems = problems[:sample_size]
    max_new = int(cfg.method.max_new_tokens)
    out = {}
    for role in roles:
        node, key = (cfg.prm, "prm.path") if role == "prm" else (cfg.model[role], f"model.{role}.path")
        tok = load_tokenizer(node, key)
        try:
            mcfg = AutoConfig.from_pretrained(node.path, revision=node.revision,
                                              trust_remote_code=node.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{key}={node.path!r}: its config could not be read ({e}).") from None
        cost = CostModel.from_config(mcfg)
        lens = [len(tok(render_prompt(tok, p, cfg.prompt), add_special_tokens=False)["input_ids"])
                for p in problems] or [0]
        prompt = sum(lens) / len(lens)
        p = int(round(prompt))
        per_sample_flops = cost.forward_flops(p, 0, 1) + cost.forward_flops(max_new, p, max_new)
        out[role] = {"prefill_tokens": prompt * samples, "decode_tokens": max_new * samples,
                     "generated_tokens": max_new * samples, "flops": per_sample_flops * samples,
                     "seconds": 0.0}
    return out
