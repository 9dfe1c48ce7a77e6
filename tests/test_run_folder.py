"""A run folder that survives damage (issue 17): every file is checked when read, a torn part is set
aside and its samples redone, a lost or garbled marker is re-derived from the file it vouches for, a
damaged shard is written again, and two `rsd-batch run` on one folder share the shards exactly once."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from rsd_batch.files import read_arrow, read_json
from rsd_batch.merge import MergeError, merge_run
from rsd_batch.rundir import result_paths
from rsd_batch.runner import run
from rsd_batch.shards import ShardError, write_shards

from conftest import make_config


def _outputs(run_dir: Path) -> dict:
    t = pa.concat_tables([read_arrow(p) for p in sorted((run_dir / "results").glob("shard-*.arrow"))])
    return {(i, k): o for i, k, o in zip(t["id"].to_pylist(), t["sample_index"].to_pylist(),
                                          t["output"].to_pylist())}


@pytest.fixture
def reference(tiny_run_args, tmp_path):
    cfg = make_config(*tiny_run_args, f"run.dir={tmp_path / 'ref'}")
    write_shards(cfg.dataset, Path(cfg.run.dir))
    run(cfg)
    merge_run(Path(cfg.run.dir))
    return _outputs(Path(cfg.run.dir))


def _stopped_after(cfg, batches: int) -> None:
    """Run until `batches` batches are committed, as a SIGTERM would stop it."""
    seen = {"n": 0}

    def stop() -> bool:
        seen["n"] += 1
        return seen["n"] > batches * cfg.run.batch_size
    run(cfg, should_stop=stop)


def test_torn_part_garbage_marker_and_lost_shard_are_repaired(tiny_run_args, reference, tmp_path):
    cfg = make_config(*tiny_run_args)
    run_dir = Path(cfg.run.dir)
    write_shards(cfg.dataset, run_dir)
    _stopped_after(cfg, 3)
    parts = sorted(result_paths(run_dir, 0)[2].glob("part-*.arrow")) + \
        sorted(result_paths(run_dir, 1)[2].glob("part-*.arrow"))
    assert parts, "the stop left committed parts"
    torn = parts[-1]
    torn.write_bytes(torn.read_bytes()[:100])  # what a machine crash can leave
    run(cfg)
    assert not torn.exists() and (run_dir / "corrupt" / f"results__{torn.parent.name}__{torn.name}").exists()
    # A garbled marker: the finished file it vouched for is checked and marked again.
    _, done, _ = result_paths(run_dir, 2)
    done.write_text("{not json")
    run(cfg)
    assert read_json(done)["rows"] == 8
    # A shard file deleted: merge says what to do, and doing it (shard again) keeps the results.
    (run_dir / "shards" / "shard-00001.arrow").unlink()
    with pytest.raises(ShardError, match=r"shard-00001.arrow is missing\. Run `rsd-batch shard` again"):
        merge_run(run_dir)
    write_shards(cfg.dataset, run_dir)
    assert run(cfg)["ran"] == []
    # A garbled manifest: the same hint, and following it keeps the results too.
    (run_dir / "manifest.json").write_text('{"version": 1, "shards": [')
    with pytest.raises(ShardError, match=r"manifest.json: not valid JSON .*Run `rsd-batch shard` again"):
        run(cfg)
    write_shards(cfg.dataset, run_dir)
    assert run(cfg)["ran"] == []
    assert merge_run(run_dir)["samples"] == 24
    assert _outputs(run_dir) == reference


def test_a_marker_without_its_file_and_a_bad_adoption(tiny_run_args, reference):
    cfg = make_config(*tiny_run_args)
    run_dir = Path(cfg.run.dir)
    write_shards(cfg.dataset, run_dir)
    run(cfg)
    final, done, _ = result_paths(run_dir, 1)
    final.unlink()
    with pytest.raises(MergeError, match=r"shard-00001.arrow is missing .* Delete .* run `rsd-batch run"):
        merge_run(run_dir)
    done.unlink()  # following the hint
    assert run(cfg)["ran"] == [1]
    # A finished file whose marker is lost, holding a repeated and a missing sample (what two
    # unlocked writers once made): it is not adopted but set aside, and the shard is redone.
    t = read_arrow(final)
    bad = pa.concat_tables([t.slice(0, 1), t.slice(0, len(t) - 1)]).replace_schema_metadata(t.schema.metadata)
    from rsd_batch.files import write_arrow
    write_arrow(final, bad)
    done.unlink()
    assert run(cfg)["ran"] == [1]
    assert any(p.name.startswith("results__shard-00001.arrow") for p in (run_dir / "corrupt").iterdir())
    assert merge_run(run_dir)["samples"] == 24
    assert _outputs(run_dir) == reference


def test_two_local_runs_on_one_folder_share_it_exactly_once(tiny_run_args, reference, tmp_path):
    """Ten times: two `rsd-batch run` processes started together on one folder. Each shard is run by
    one of them (a per-shard lock), the other takes other shards or waits; the merge is exactly-once."""
    repo = Path(__file__).resolve().parents[1]
    exe = str(Path(sys.executable).parent / "rsd-batch")
    for trial in range(10):
        args = [a for a in tiny_run_args if not a.startswith("run.dir=")] + [f"run.dir={tmp_path / f't{trial}'}"]
        subprocess.run([exe, "shard", *args], check=True, capture_output=True, cwd=repo)
        procs = [subprocess.Popen([exe, "run", *args], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}) for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err.decode()[-2000:]
        run_dir = tmp_path / f"t{trial}"
        assert merge_run(run_dir)["samples"] == 24
        assert _outputs(run_dir) == reference
        assert not (run_dir / "corrupt").exists()


def test_a_model_that_fails_to_load_claims_nothing_and_says_why(tiny_run_args, tiny_models, tmp_path):
    import shutil

    from rsd_batch.models import ModelLoadError
    broken = tmp_path / "broken-target"
    shutil.copytree(tiny_models["target"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    cfg = make_config(*tiny_run_args, f"model.target.path={broken}")
    write_shards(cfg.dataset, Path(cfg.run.dir))
    with pytest.raises(ModelLoadError, match=r"the target model \(model.target.path=.*broken-target\) did not load: "):
        run(cfg)
    assert not (Path(cfg.run.dir) / "run.json").exists()  # the folder is not claimed
    # The fix (the right folder) then runs in the same folder.
    assert run(make_config(*tiny_run_args))["ran"] == [0, 1, 2]


def test_weights_changed_in_place_are_refused_and_a_copy_is_accepted(tiny_run_args, tiny_models, tmp_path):
    import shutil

    from rsd_batch.rundir import RunConfigMismatch
    copy = tmp_path / "target-copy"
    shutil.copytree(tiny_models["target"], copy)
    cfg = make_config(*tiny_run_args, f"model.target.path={copy}")
    write_shards(cfg.dataset, Path(cfg.run.dir))
    _stopped_after(cfg, 2)
    # The same files elsewhere: the same model, the run resumes.
    assert run(make_config(*tiny_run_args))["complete"]
    # Other weights at the same path (as retraining writes them): refused, naming the role.
    import safetensors.torch as st
    tensors = st.load_file(str(copy / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    st.save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RunConfigMismatch, match=r"models.target.content.files.model.safetensors"):
        run(make_config(*tiny_run_args, f"model.target.path={copy}"))


def test_doctor_reports_every_damage_and_repair_makes_the_run_whole(tiny_run_args, reference):
    from rsd_batch.doctor import examine
    cfg = make_config(*tiny_run_args)
    run_dir = Path(cfg.run.dir)
    write_shards(cfg.dataset, run_dir)
    _stopped_after(cfg, 3)
    assert examine(run_dir)["findings"] == []
    parts = sorted(run_dir.glob("results/shard-*.parts/part-*.arrow"))
    stray = run_dir / "results" / "shard-00042.parts"
    stray.mkdir()
    (stray / "part-00009-n4.arrow").write_bytes(parts[0].read_bytes())
    parts[0].write_bytes(b"garbage")
    (run_dir / "locks" / "shard-00007.lock").write_text("pid 1 on a-dead-node\n")
    found = examine(run_dir)["findings"]
    assert {Path(f["path"]).name for f in found} == {parts[0].name, "part-00009-n4.arrow", "shard-00007.lock"}
    assert all(not f["repaired"] and f["fix"] for f in found)
    assert parts[0].exists()  # looking changes nothing
    # The command line: exit 1 with findings, then repair=true applies them, then the run completes.
    import subprocess, sys
    exe = str(Path(sys.executable).parent / "rsd-batch")
    out = subprocess.run([exe, "doctor", str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 1 and "3 problems" in out.stdout and "repair=true" in out.stdout
    out = subprocess.run([exe, "doctor", str(run_dir), "repair=true"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("repaired") == 3, out.stdout + out.stderr
    assert examine(run_dir)["findings"] == []
    run(cfg)
    assert merge_run(run_dir)["samples"] == 24
    assert _outputs(run_dir) == reference


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs of this test's own (root is available here and in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def _fill(disk: Path, leave: int) -> Path:
    import shutil as sh
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    free = sh.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_a_full_disk_loses_nothing_and_each_step_resumes(tiny_run_args, reference, small_disk):
    from rsd_batch.files import DiskFull
    args = [a for a in tiny_run_args if not a.startswith("run.dir=")] + [f"run.dir={small_disk / 'run'}"]
    cfg = make_config(*args)
    run_dir = Path(cfg.run.dir)
    write_shards(cfg.dataset, run_dir)
    filler = _fill(small_disk, 24 << 10)  # room for run.json and a few parts, not for the run
    with pytest.raises(DiskFull, match=r"the disk is full \(.* free\) while writing .*Free some space"):
        run(cfg)
    assert not list(run_dir.rglob(".*.tmp"))  # no half-written file left
    filler.unlink()
    assert run(cfg)["complete"]
    _fill(small_disk, 4 << 10)
    with pytest.raises(DiskFull, match=r"merged: the disk is full .* this file needs about"):
        merge_run(run_dir)
    (small_disk / "filler").unlink()
    assert merge_run(run_dir)["samples"] == 24
    assert _outputs(run_dir) == reference
    from omegaconf import OmegaConf

    from rsd_batch.config import ExportConfig
    from rsd_batch.export import export_run
    export_cfg = OmegaConf.structured(ExportConfig(run_dir=str(run_dir)))
    _fill(small_disk, 2 << 10)
    with pytest.raises(DiskFull, match=r"data: the disk is full"):
        export_run(export_cfg)
    (small_disk / "filler").unlink()
    assert export_run(export_cfg)["rows"] == 24


CHAOS = ["kill", "truncate_part", "garble_marker", "edit_result", "weights_in_place", "concurrent"]


@pytest.mark.parametrize("seed", range(24))
def test_chaos(seed, tiny_run_args, tiny_models, reference, tmp_path):
    """Seeded disruptions of a run (4 of each kind). After each: `doctor repair=true` where the folder
    was damaged, then run and merge; the outputs equal an uninterrupted run's: 0 lost, 0 duplicated."""
    import os
    import random
    import shutil
    import signal
    import time

    from rsd_batch.doctor import examine
    from rsd_batch.rundir import RunConfigMismatch
    rng = random.Random(seed)
    kind = CHAOS[seed % len(CHAOS)]
    target = tmp_path / "target"
    shutil.copytree(tiny_models["target"], target)
    args = [a for a in tiny_run_args if not a.startswith("run.dir=")] + [
        f"run.dir={tmp_path / 'run'}", f"model.target.path={target}"]
    cfg = make_config(*args)
    run_dir = Path(cfg.run.dir)
    write_shards(cfg.dataset, run_dir)
    exe = str(Path(sys.executable).parent / "rsd-batch")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if kind in ("kill", "concurrent"):
        procs = [subprocess.Popen([exe, "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env) for _ in range(1 if kind == "kill" else 2)]
        if kind == "kill":  # SIGKILL at a random moment: loading, mid-batch, between shards
            time.sleep(rng.uniform(2.0, 9.0))
            for p in procs:
                p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=600)
    else:
        _stopped_after(cfg, rng.randint(1, 5))
        parts = sorted(run_dir.glob("results/shard-*.parts/part-*.arrow"))
        finals = sorted(run_dir.glob("results/shard-*.arrow"))
        if kind == "truncate_part" and parts:
            p = rng.choice(parts)
            p.write_bytes(p.read_bytes()[: rng.randint(0, p.stat().st_size - 1)])
        elif kind == "garble_marker" and finals:
            marker = rng.choice(sorted(run_dir.glob("results/*.done.json")))
            marker.write_bytes(os.urandom(rng.randint(0, 64)))
        elif kind == "edit_result" and finals:
            f = rng.choice(finals)
            t = read_arrow(f)
            out = t["output"].to_pylist()
            out[rng.randrange(len(out))] = "edited"
            from rsd_batch.files import write_arrow
            write_arrow(f, t.set_column(t.schema.get_field_index("output"), "output", pa.array(out))
                        .replace_schema_metadata(t.schema.metadata))
        elif kind == "weights_in_place":
            import safetensors.torch as st
            original = (target / "model.safetensors").read_bytes()
            tensors = st.load_file(str(target / "model.safetensors"))
            name = rng.choice(sorted(tensors))
            tensors[name] = tensors[name] + 1.0
            st.save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
            with pytest.raises(RunConfigMismatch, match="models.target.content"):
                run(cfg)
            (target / "model.safetensors").write_bytes(original)  # the right weights back
    examine(run_dir, repair=True)
    assert run(cfg)["complete"]
    assert examine(run_dir)["findings"] == []
    assert merge_run(run_dir)["samples"] == 24
    assert _outputs(run_dir) == reference
