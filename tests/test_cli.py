"""The `rsd-batch` command as a user runs it: Hydra validation, --cfg, multirun, clear errors."""
from __future__ import annotations

import json

import pytest

from rsd_batch.config import ROOT

from conftest import cli


def test_main_job_prints_summary_and_where_outputs_are(tiny_run_args, tmp_path):
    proc = cli("main", *tiny_run_args)
    out = proc.stdout
    assert "sharded 24 problems" in out and "3 shards run, 0 already done" in out
    assert "24 samples of 24 problems" in out and "target" in out and "FLOPs/sample" in out
    assert f"merged dataset: {tmp_path / 'run' / 'merged' / 'data.parquet'}" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == 24 and summary["method"] == "target_only"
    assert (tmp_path / "run" / "run.json").exists()
    assert list((tmp_path / "run" / "logs" / "hydra").glob("*/.hydra/config.yaml"))
    again = cli("main", *tiny_run_args).stdout  # everything is done: nothing runs twice
    assert "0 shards run, 3 already done" in again


def test_config_errors_fail_before_anything_runs(tmp_path):
    bad_key = cli("shard", "run.batchsize=3", f"run.dir={tmp_path}", check=False)
    assert bad_key.returncode != 0 and "Key 'batchsize' not in 'RunConfig'" in bad_key.stderr
    bad_type = cli("shard", "run.batch_size=lots", f"run.dir={tmp_path}", check=False)
    assert bad_type.returncode != 0 and "batch_size" in bad_type.stderr
    bad_enum = cli("shard", "dataset.on_bad_row=maybe", f"run.dir={tmp_path}", check=False)
    assert bad_enum.returncode != 0 and "on_bad_row" in bad_enum.stderr
    bad_method = cli("run", "method.name=beam", f"run.dir={tmp_path}", check=False)
    assert bad_method.returncode != 0 and "Invalid value 'beam'" in bad_method.stderr
    assert not list(tmp_path.iterdir())  # nothing was written


def test_cfg_job_prints_the_resolved_config():
    out = cli("run", "run.batch_size=7", "--cfg", "job", "--resolve").stdout
    assert "batch_size: 7" in out and "name: toy_arith" in out
    assert "dir: runs/toy_arith-rsd" in out and "${" not in out
    assert f"path: {ROOT}/models/toy/target" in out


def test_user_errors_are_one_message_not_a_traceback(tiny_run_args, tmp_path):
    missing = cli("shard", "dataset.source=/nope/problems.jsonl", f"run.dir={tmp_path}", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: /nope/problems.jsonl: no such file")
    assert "Traceback" not in missing.stderr
    cli("shard", *tiny_run_args)
    unmerged = cli("merge", *tiny_run_args, check=False)
    assert unmerged.returncode == 2 and "nothing was run there yet" in unmerged.stderr
    no_model = cli("run", *tiny_run_args, "model.target.path=/nope/model", check=False)
    assert no_model.returncode == 2 and "model.target.path='/nope/model': no such folder" in no_model.stderr


def test_multirun_sweep_gives_one_run_folder_per_point(tiny_run_args, tmp_path):
    args = [a for a in tiny_run_args if not a.startswith(("run.dir", "method="))]  # the sweep sets it
    proc = cli("main", "-m", "method=target_only,draft_only", *args, f"hydra.sweep.dir={tmp_path}/multirun",
               f"run.dir={tmp_path}/sweep/" + "${method.name}")
    for m in ("target_only", "draft_only"):
        summary = json.loads((tmp_path / "sweep" / m / "summary.json").read_text())
        assert summary["method"] == m and summary["samples"] == 24
    assert proc.stdout.count("24 samples of 24 problems") == 2


@pytest.mark.parametrize("job", ["status", "merge", "report", "shard", "doctor", "--help"])
def test_commands_that_decode_nothing_import_no_torch(job, tiny_run_args, tmp_path):
    """status, merge, report, shard, doctor and --help start in well under a second: torch and transformers
    are imported only by the jobs that load models."""
    import subprocess
    import sys

    args = {"status": ["status", *tiny_run_args], "merge": ["merge", *tiny_run_args],
            "report": ["report", str(tmp_path)], "shard": ["shard", *tiny_run_args],
            "doctor": ["doctor", str(tmp_path)], "--help": ["--help"]}[job]
    code = ("import sys\nfrom rsd_batch.cli import main\nsys.argv = ['rsd-batch'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert "heavy: []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]


@pytest.mark.parametrize("setting,message", [
    ("run.batch_size=0", "run.batch_size=0: must be an integer >= 1"),
    ("method.max_new_tokens=0", "method.max_new_tokens=0: must be an integer >= 1"),
    ("method.threshold=-0.1", "method.threshold=-0.1: must be >= 0 (above 1: every draft step is rewritten)"),
    ("method.top_p=1.5", "method.top_p=1.5: must be in (0, 1]"),
    ("method.rewrite_share=2", "method.rewrite_share=2.0: must be in [0, 1]"),
])
def test_settings_out_of_range_are_refused_before_anything_runs(setting, message, tiny_run_args, tmp_path):
    run_dir = tmp_path / "fresh"
    proc = cli("main", *tiny_run_args, f"run.dir={run_dir}", setting, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr[-1000:]
    # not sharded, no run claimed (Hydra's own log folder is all there is)
    assert [p.name for p in run_dir.iterdir()] == ["logs"]
