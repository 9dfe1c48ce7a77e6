"""Shards and manifest: determinism, integrity, refusing to mix problem sets in one run folder."""
from __future__ import annotations

import pytest

from rsd_batch.files import read_arrow, sha256_file
from rsd_batch.shards import ShardError, plan_shards, read_shard, write_shards

from conftest import make_config


def shard(run_dir, *overrides):
    cfg = make_config("dataset=math500", *overrides).dataset
    return write_shards(cfg, run_dir)


def test_same_input_and_config_give_byte_identical_shards(tmp_path):
    a = shard(tmp_path / "a", "dataset.shard_size=64")
    b = shard(tmp_path / "b", "dataset.shard_size=64")
    assert a == b
    for s in a["shards"]:
        assert (tmp_path / "a" / s["path"]).read_bytes() == (tmp_path / "b" / s["path"]).read_bytes()
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def test_manifest_describes_the_shards(tmp_path):
    m = shard(tmp_path, "dataset.num_shards=3")
    assert [s["rows"] for s in m["shards"]] == [167, 167, 166]
    ids = []
    for s in m["shards"]:
        assert sha256_file(tmp_path / s["path"]) == s["sha256"]
        t = read_arrow(tmp_path / s["path"])
        assert t.num_rows == s["rows"]
        ids += t["id"].to_pylist()
    assert len(ids) == len(set(ids)) == m["num_rows"] == 500
    assert "problem: string" in m["schema"] and m["dataset"]["name"] == "math500"
    assert m["source"]["format"] == "jsonl" and len(m["source"]["sha256"]) == 64


def test_reshard_is_a_noop_and_a_different_config_is_refused(tmp_path):
    m1 = shard(tmp_path, "dataset.shard_size=100")
    mtime = (tmp_path / m1["shards"][0]["path"]).stat().st_mtime_ns
    assert shard(tmp_path, "dataset.shard_size=100") == m1
    assert (tmp_path / m1["shards"][0]["path"]).stat().st_mtime_ns == mtime
    with pytest.raises(ShardError, match="already holds shards of another"):
        shard(tmp_path, "dataset.shard_size=50")


def test_tampered_shard_is_detected(tmp_path):
    m = shard(tmp_path, "dataset.shard_size=250")
    path = tmp_path / m["shards"][1]["path"]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ShardError, match="sha256 does not match"):
        read_shard(tmp_path, m, 1)


@pytest.mark.parametrize("rows,size,n,expect", [(10, 4, None, [4, 3, 3]), (3, 1000, None, [3]),
                                                 (5, 1, 8, [1, 1, 1, 1, 1]), (7, 100, 2, [4, 3])])
def test_plan_shards(rows, size, n, expect):
    cfg = make_config(f"dataset.shard_size={size}", f"dataset.num_shards={n if n else 'null'}").dataset
    plan = plan_shards(rows, cfg)
    assert [length for _, length in plan] == expect
    assert [off for off, _ in plan] == [sum(expect[:i]) for i in range(len(expect))]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """A temp file is private (0600) while written; the finished output is shared like any file the
    user writes (a cluster group reads the merged data), and no temp file is left behind."""
    from rsd_batch.files import _UMASK, atomic_path, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("b")
    for name in ("a.json", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_UMASK != 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]


# ---------------------------------------------------------------- streaming: the bytes of the in-memory reader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from shard_corpus import build
    return build(tmp_path_factory.mktemp("corpus"))


def _shard_case(corpus, name, run_dir):
    from shard_corpus import overrides
    src, extra = corpus[name]
    cfg = make_config(*overrides(src, extra)).dataset
    return write_shards(cfg, run_dir)


@pytest.mark.parametrize("name", ["math500", "gsm8k", "olympiad", "minerva", "gaokao", "clean_ids",
                                  "clean_hash_ids", "clean_limit", "dirty_skip", "dirty_number",
                                  "dirty_keep_first", "csv", "parquet", "arrow"])
def test_streamed_shards_have_the_recorded_bytes(corpus, name, tmp_path):
    """tests/data/shard_hashes.json was written by the in-memory reader this one replaced (its
    quarantine lines since fixed: a mixed-type cell is its value there, not Arrow's wrapper)."""
    import json
    from pathlib import Path

    from shard_corpus import shard_hashes
    expected = json.loads((Path(__file__).parent / "data" / "shard_hashes.json").read_text())[name]
    manifest = _shard_case(corpus, name, tmp_path)
    assert shard_hashes(tmp_path, manifest) == expected
    assert not (tmp_path / ".staging").exists()


@pytest.mark.parametrize("name", ["gsm8k", "olympiad", "clean_hash_ids", "dirty_skip", "dirty_number",
                                  "dirty_keep_first", "csv", "parquet"])
def test_small_blocks_give_the_same_rows(corpus, name, tmp_path, monkeypatch):
    """Blocks of ~100 kB (dozens per file): duplicates across blocks, types that differ between blocks
    and bad lines in some blocks only give the same rows and quarantine as one block."""
    import rsd_batch.problems as problems
    one = _shard_case(corpus, name, tmp_path / "one")
    monkeypatch.setattr(problems, "BLOCK_BYTES", 100_000)
    monkeypatch.setattr(problems, "BATCH_ROWS", 300)
    many = _shard_case(corpus, name, tmp_path / "many")
    assert [s["rows"] for s in one["shards"]] == [s["rows"] for s in many["shards"]]
    assert one["schema"] == many["schema"] and one["num_with_answer"] == many["num_with_answer"]
    for a, b in zip(one["shards"], many["shards"]):
        ta, tb = read_arrow(tmp_path / "one" / a["path"]), read_arrow(tmp_path / "many" / b["path"])
        if name == "csv":  # a cell over two lines makes one block number rows by record, the others by line
            ta, tb = ta.drop_columns(["source_row"]), tb.drop_columns(["source_row"])
        assert ta.equals(tb)
    qa, qb = tmp_path / "one" / "quarantine.jsonl", tmp_path / "many" / "quarantine.jsonl"
    assert qa.exists() == qb.exists() and (not qa.exists() or qa.read_text() == qb.read_text())


def test_direct_cut_and_staged_path_write_the_same_bytes(tmp_path, monkeypatch):
    """A plain JSON-lines file is counted while it is hashed (lines that open an object) and cut into
    shards in pass one; blank lines do not change that count. A broken line (counted, then bad), a
    late repeated id and a block whose metadata changes type each send it back to staging at that
    point. The same file gzipped cannot be counted and is always staged: both must give the same bytes."""
    import gzip
    import json

    import rsd_batch.problems as problems
    from rsd_batch.problems import open_problems
    from rsd_batch.staging import stage

    monkeypatch.setattr(problems, "BLOCK_BYTES", 20_000)  # ~60 blocks, so the switch lands mid-file
    rows = [{"id": f"q{i:05d}", "problem": f"What is {i} + {i % 7}?" + " pad" * (i % 13), "answer": str(i + i % 7),
             "level": i % 5} for i in range(4000)]
    lines = [json.dumps(r) for r in rows]
    variants = {  # name -> (lines, cut in pass one)
        "clean": (lines, True),
        "blank": (lines[:2000] + ["   "] + lines[2000:] + [""], True),
        "broken": (lines[:2000] + ['{"id": "cut short", '] + lines[2000:], False),
        "late_repeat": (lines + [json.dumps({**rows[3], "problem": "again"})], False),
        "level_turns_text": (lines[:3000] + [json.dumps({**r, "level": f"L{r['level']}"}) for r in rows[3000:]],
                             False),
    }
    for name, (body, direct) in variants.items():
        text = "\n".join(body) + "\n"
        (tmp_path / f"{name}.jsonl").write_text(text)
        (tmp_path / f"{name}.jsonl.gz").write_bytes(gzip.compress(text.encode()))
        got = []
        for suffix in (".jsonl", ".jsonl.gz"):
            cfg = make_config("dataset=math500", f"dataset.source={tmp_path / name}{suffix}", "dataset.fields.id=id",
                              "dataset.fields.solution=null", "dataset.shard_size=300",
                              "dataset.on_bad_row=skip", "dataset.on_duplicate_id=keep_first").dataset
            calls = []
            staged = stage(open_problems(cfg), cfg, folder=tmp_path / "staging",
                           cut=lambda n: calls.append(n) or _Collect())
            if suffix == ".jsonl":
                assert calls == [len(body) - body.count("   ") - body.count("")] and staged.cut == direct, name
            else:
                assert calls == [] and not staged.cut
            out = tmp_path / f"{name}{suffix}-run"
            m = write_shards(cfg, out)
            assert m["num_rows"] == len(rows) and not (out / ".staging").exists()
            got.append([(out / s["path"]).read_bytes() for s in m["shards"]])
        assert got[0] == got[1], name
    clean = read_arrow(tmp_path / "clean.jsonl-run" / "shards" / "shard-00000.arrow")
    mixed = read_arrow(tmp_path / "level_turns_text.jsonl-run" / "shards" / "shard-00000.arrow")
    assert mixed["problem"].equals(clean["problem"]) and mixed["metadata"].type != clean["metadata"].type
    # a field with both types is JSON text in every row, whichever block a row was read in
    levels = [json.loads(m["level"]) for s in sorted((tmp_path / "level_turns_text.jsonl-run" / "shards").iterdir())
              for m in read_arrow(s)["metadata"].to_pylist()]
    assert levels == [r["level"] for r in rows[:3000]] + [f"L{r['level']}" for r in rows[3000:]]


class _Collect:
    """A cut that keeps what it is fed: enough to see which path pass one took."""

    def __init__(self):
        self.tables = []

    def feed(self, table):
        self.tables.append(table)

    def finish(self):
        pass

    def abandon(self):
        held, self.tables = self.tables, []
        return [], held
