"""Shared fixtures: real tiny models saved with save_pretrained, real problem files, real configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from rsd_batch.config import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"
CLI = str(Path(sys.executable).with_name("rsd-batch"))


def make_config(*overrides: str):
    """The job config exactly as `rsd-batch` would compose it, with these overrides."""
    with initialize_config_dir(version_base=None, config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides))


def cli(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsd-batch {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def toy_tokenizer():
    from rsd_batch.toy.build import build_toy_tokenizer
    return build_toy_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, toy_tokenizer) -> dict[str, str]:
    """Random-init Qwen2 draft and target in the toy tokenizer: noise text, real loading path."""
    from rsd_batch.toy.build import build_random_model
    root = tmp_path_factory.mktemp("models")
    return {
        "draft": str(build_random_model(root / "draft", toy_tokenizer, num_layers=1, hidden_size=32, seed=1)),
        "target": str(build_random_model(root / "target", toy_tokenizer, num_layers=2, hidden_size=64, seed=2)),
        "prm": str(build_random_model(root / "prm", toy_tokenizer, num_layers=2, hidden_size=32, seed=3)),
        # Large init: its greedy choices change with the context (the others mostly repeat "\n").
        "wild": str(build_random_model(root / "wild", toy_tokenizer, num_layers=1, hidden_size=32, seed=4,
                                       initializer_range=0.6)),
    }


@pytest.fixture(scope="session")
def toy_problems(tmp_path_factory) -> Path:
    from rsd_batch.toy.problems import generate_problems, write_problem_set
    path = tmp_path_factory.mktemp("problems") / "toy.jsonl"
    write_problem_set(generate_problems(24, seed=11, stream="test"), path)
    return path


@pytest.fixture
def tiny_run_args(tiny_models, toy_problems, tmp_path) -> list[str]:
    """Overrides for a fast end-to-end run on the tiny models (short outputs, small shards)."""
    return [f"dataset.source={toy_problems}", "dataset.shard_size=8", "method=target_only",
            f"model.draft.path={tiny_models['draft']}", f"model.target.path={tiny_models['target']}",
            f"prm.path={tiny_models['prm']}",
            "method.max_new_tokens=12", "run.batch_size=4", "run.progress=false",
            f"run.dir={tmp_path / 'run'}"]
