"""Reading problem sets: every source kind, the five real benchmark files, every kind of bad row."""
from __future__ import annotations

import json
from pathlib import Path
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsd_batch.problems import ProblemSetError, load_problems
from rsd_batch.shards import read_manifest, write_shards

from conftest import make_config

REAL_SETS = {  # preset -> (rows, rows whose gold answer can be read)
    "math500": (500, 500),
    "gsm8k": (1319, 1319),
    "minerva_math": (272, None),
    "gaokao2023en": (385, 383),  # two rows have an empty gold: run, not graded
    "olympiadbench": (675, 675),
}


def dataset_cfg(*overrides):
    return make_config(*overrides).dataset


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return path


@pytest.mark.parametrize("preset", sorted(REAL_SETS))
def test_real_benchmark_files_shard_with_their_presets(preset, tmp_path):
    cfg = dataset_cfg(f"dataset={preset}")
    ps = load_problems(cfg)
    rows, with_answer = REAL_SETS[preset]
    assert len(ps.table) == rows and ps.bad_rows == []
    assert ps.table.column_names[:4] == ["id", "problem", "answer", "source_row"]
    assert len(set(ps.table["id"].to_pylist())) == rows
    assert all(p.strip() for p in ps.table["problem"].to_pylist())
    if with_answer is not None:
        assert len(ps.table) - ps.table["answer"].null_count == with_answer
    manifest = write_shards(cfg, tmp_path)
    assert sum(s["rows"] for s in manifest["shards"]) == rows
    assert manifest["source"]["sha256"] and manifest["num_rows"] == rows


def test_field_mapping_answers_and_metadata():
    gsm = load_problems(dataset_cfg("dataset=gsm8k")).table.slice(0, 1).to_pylist()[0]
    assert gsm["answer"] == "18"  # read from "#### 18" at the end of the rationale
    assert gsm["metadata"]["answer"].endswith("#### 18")  # the rationale is kept
    oly = load_problems(dataset_cfg("dataset=olympiadbench")).table.slice(0, 1).to_pylist()[0]
    assert oly["id"] == "1606" and oly["answer"] == "2"  # a list answer, an integer id
    assert oly["metadata"]["answer_type"] == "Numerical"
    m500 = load_problems(dataset_cfg("dataset=math500")).table.slice(0, 1).to_pylist()[0]
    assert m500["id"] == "test/precalculus/807.json" and m500["metadata"]["level"] == 2


def test_hash_ids_are_stable_and_given_ids_kept(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"problem": f"What is {i}+1?", "answer": str(i + 1)}
                                             for i in range(5)])
    a = load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.id=null")).table
    b = load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.id=null")).table
    assert a["id"].to_pylist() == b["id"].to_pylist()
    assert len(set(a["id"].to_pylist())) == 5 and all(len(i) == 16 for i in a["id"].to_pylist())


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "arrow_file", "arrow_stream", "disk"])
def test_every_source_kind_reads_the_same_rows(kind, tmp_path):
    rows = [{"pid": f"p{i}", "question": f"Compute {i} * 3.", "gold": str(3 * i), "level": i % 3}
            for i in range(7)]
    table = pa.Table.from_pylist(rows)
    path = tmp_path / {"jsonl": "s.jsonl", "json": "s.json", "parquet": "s.parquet", "csv": "s.csv",
                       "arrow_file": "s.arrow", "arrow_stream": "s.arrow", "disk": "ds"}[kind]
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        pq.write_table(table, path)
    elif kind == "csv":
        import pyarrow.csv as pcsv
        pcsv.write_csv(table, path)
    elif kind == "arrow_file":
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    elif kind == "arrow_stream":
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table)
    else:
        import datasets
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    got = load_problems(dataset_cfg(f"dataset.source={path}", "dataset.fields.problem=question",
                                    "dataset.fields.answer=gold", "dataset.fields.id=pid")).table
    assert got["id"].to_pylist() == [r["pid"] for r in rows]
    assert got["problem"].to_pylist() == [r["question"] for r in rows]
    assert got["answer"].to_pylist() == [r["gold"] for r in rows]
    assert got["metadata"].to_pylist() == [{"level": r["level"]} for r in rows]
    assert got["source_row"].to_pylist() == list(range(1, 8))


# ---------------------------------------------------------------- bad input

GOOD = [{"id": f"q{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]


def bad_case(tmp_path, name):
    """A file with one bad row at line 3; returns (path, field named in the error, words in it)."""
    p = tmp_path / "bad.jsonl"
    rows, raw = list(GOOD[:2]), []
    if name == "malformed_json":
        raw = [b'{"id": "q9", "problem": "What is 1 + 1?", "answer": "2"']
        field, words = None, "malformed JSON"
    elif name == "missing_problem":
        rows.append({"id": "q9", "answer": "2"})
        field, words = "problem", "missing or empty"
    elif name == "empty_problem":
        rows.append({"id": "q9", "problem": "   ", "answer": "2"})
        field, words = "problem", "missing or empty"
    elif name == "wrong_type":
        rows.append({"id": "q9", "problem": {"text": "What?"}, "answer": "2"})
        field, words = "problem", "wrong type"
    elif name == "non_utf8":
        raw = ['{"id": "q9", "problem": "caf\xe9 costs?", "answer": "2"}'.encode("latin-1")]
        field, words = None, "not valid UTF-8"
    elif name == "not_an_object":
        raw = [b'["a list", "not an object"]']
        field, words = None, "not an object"
    else:
        raise ValueError(name)
    with open(p, "wb") as f:
        for r in rows:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw:
            f.write(line + b"\n")
        f.write((json.dumps(GOOD[3]) + "\n").encode())
    return p, field, words


BAD_CASES = ["malformed_json", "missing_problem", "empty_problem", "wrong_type", "non_utf8", "not_an_object"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_stops_before_any_shard_naming_file_line_field(case, tmp_path):
    path, field, words = bad_case(tmp_path, case)
    cfg = dataset_cfg(f"dataset.source={path}")
    with pytest.raises(ProblemSetError) as err:
        write_shards(cfg, tmp_path / "run")
    msg = str(err.value)
    assert str(path.resolve()) in msg and "line 3" in msg and words in msg
    if field:
        assert f"field '{field}'" in msg
    assert "on_bad_row=skip" in msg or "UTF-8" in msg  # says what to do
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("case", BAD_CASES)
def test_skip_quarantines_bad_rows_and_keeps_the_rest(case, tmp_path):
    path, field, words = bad_case(tmp_path, case)
    cfg = dataset_cfg(f"dataset.source={path}", "dataset.on_bad_row=skip")
    manifest = write_shards(cfg, tmp_path / "run")
    assert manifest["num_rows"] == 3 and manifest["quarantine"]["rows"] == 1
    q = [json.loads(line) for line in (tmp_path / "run" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and q[0]["line"] == 3 and words in q[0]["reason"] and q[0]["field"] == field
    assert q[0]["raw"]  # the row itself, to fix and re-run


def test_unknown_file_type_and_missing_file(tmp_path):
    p = tmp_path / "problems.xlsx"
    p.write_text("x")
    with pytest.raises(ProblemSetError, match=r"unknown file type '.xlsx'.*dataset.format"):
        load_problems(dataset_cfg(f"dataset.source={p}"))
    with pytest.raises(ProblemSetError, match="no such file"):
        load_problems(dataset_cfg(f"dataset.source={tmp_path / 'nope.jsonl'}"))


def test_unknown_column_names_the_columns(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(ProblemSetError, match=r"no column 'problem'.*question, answer.*fields.problem"):
        load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.id=null"))


def test_duplicate_ids(tmp_path):
    rows = [{"id": "a", "problem": "p1"}, {"id": "b", "problem": "p2"}, {"id": "a", "problem": "p3"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(ProblemSetError, match=r"line 3.*duplicate id 'a' \(first seen at line 1\)"):
        load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.answer=null"))
    kept = load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.answer=null",
                                     "dataset.on_duplicate_id=keep_first"))
    assert kept.table["problem"].to_pylist() == ["p1", "p2"] and len(kept.bad_rows) == 1
    numbered = load_problems(dataset_cfg(f"dataset.source={src}", "dataset.fields.answer=null",
                                         "dataset.on_duplicate_id=number"))
    assert numbered.table["id"].to_pylist() == ["a", "b", "a#2"]
    # Without an id column the same problem text twice is a duplicate too.
    same = write_jsonl(tmp_path / "q.jsonl", [{"problem": "x"}, {"problem": "x"}])
    with pytest.raises(ProblemSetError, match="the same problem text appears twice"):
        load_problems(dataset_cfg(f"dataset.source={same}", "dataset.fields.id=null",
                                  "dataset.fields.answer=null"))


def test_hub_name_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ProblemSetError, match=r"could not load the Hugging Face dataset 'openai/gsm8k'.*save_to_disk"):
        load_problems(dataset_cfg("dataset.source=hf:openai/gsm8k", "dataset.hf_config=main"))


def test_manifest_is_read_back(tmp_path):
    cfg = dataset_cfg("dataset=gaokao2023en", "dataset.shard_size=100")
    write_shards(cfg, tmp_path)
    m = read_manifest(tmp_path)
    assert [s["rows"] for s in m["shards"]] == [97, 96, 96, 96]


# ---------------------------------------------------------------- every bad row caught, never half-kept


def _load(path, *overrides):
    return load_problems(dataset_cfg(f"dataset.source={path}", "dataset.fields.id=null",
                                     "dataset.fields.solution=null", *overrides))


def test_a_duplicate_quarantined_in_skip_mode_is_not_also_kept(tmp_path, tiny_run_args):
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    path = write_jsonl(tmp_path / "dup.jsonl", rows + [rows[2], rows[4]])
    ps = _load(path, "dataset.on_bad_row=skip")
    assert len(ps.table) == 6 and len(set(ps.table["id"].to_pylist())) == 6
    assert [b.row for b in ps.bad_rows] == [7, 8] and all("duplicate id" in b.reason for b in ps.bad_rows)
    with pytest.raises(ProblemSetError, match=r"line 7, field 'problem': duplicate id .* \(1 more bad rows"):
        _load(path)


def test_a_lone_surrogate_is_a_bad_row_not_a_crash(tmp_path):
    path = write_jsonl(tmp_path / "sur.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}],
                       raw_lines=[b'{"problem": "bad \\ud800 text", "answer": "3"}'])
    with pytest.raises(ProblemSetError, match=r"line 2: text that is not valid Unicode \(a lone surrogate"):
        _load(path)
    ps = _load(path, "dataset.on_bad_row=skip")
    assert len(ps.table) == 1 and ps.bad_rows[0].row == 2


def test_numbers_and_booleans_are_not_text(tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl", [{"problem": "What is 1 + 1?", "answer": 2},
                                                  {"problem": 42, "answer": "42"},
                                                  {"problem": "Is 3 odd?", "answer": True}])
    with pytest.raises(ProblemSetError, match=r"line 2, field 'problem': wrong type: a number where text"):
        _load(path)
    ps = _load(path, "dataset.on_bad_row=skip")
    assert ps.table["answer"].to_pylist() == ["2"]  # a number is a fine gold answer
    assert [(b.row, b.field) for b in ps.bad_rows] == [(2, "problem"), (3, "answer")]
    assert "a boolean where text, a number or a list was expected" in ps.bad_rows[1].reason
    pq.write_table(pa.table({"problem": pa.array([1, 2], pa.int64()), "answer": ["1", "2"]}), tmp_path / "i.parquet")
    with pytest.raises(ProblemSetError, match=r"row 1, field 'problem': wrong type: a number where text"):
        _load(tmp_path / "i.parquet")


@pytest.mark.parametrize("content,message", [
    (b"", "no rows (the file is empty or every line is blank)"),
    (b"\n  \n\n", "no rows (the file is empty or every line is blank)"),
    (b"{oops\n[1, 2\n", "not JSON lines: line 1 is '{oops'"),
    (b'[{"problem": "What is 1 + 1?", "answer": "2"}]\n', "line 1: a JSON list, not an object"),
    (b"problem,answer\nWhat is 1 + 1?,2\n", "not JSON lines: line 1 is 'problem,answer'"),
])
def test_a_file_with_no_usable_row_says_why(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(ProblemSetError, match=re.escape(message)):
        _load(path)


def test_invisible_problems_are_blank_and_categorical_columns_read(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"},
                                                  {"problem": "\u0000\u200b\u2060 \ufeff", "answer": "3"}])
    ps = _load(path, "dataset.on_bad_row=skip")
    assert len(ps.table) == 1 and ps.bad_rows[0].reason == "missing or empty problem text"
    import pandas as pd
    df = pd.DataFrame({"problem": ["What is 1 + 1?", "What is 2 + 2?"], "answer": ["2", "4"]})
    df["problem"] = df["problem"].astype("category")
    df.to_parquet(tmp_path / "cat.parquet")
    assert _load(tmp_path / "cat.parquet").table["problem"].to_pylist() == ["What is 1 + 1?", "What is 2 + 2?"]


def test_csv_bad_bytes_and_ragged_rows_are_bad_rows_with_their_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("problem,answer\nWhat is 1 + 1?,2\n".encode() + "Café costs 3 €?,3\n".encode("cp1252")
                     + b"What is 2 + 2?,4,extra\nWhat is 3 + 3?,6\n")
    with pytest.raises(ProblemSetError, match=rf"{re.escape(str(path))}: row 2: not valid UTF-8 \(byte 0xe9 at "
                                              r"column 4\)\. Re-encode .* \(1 more bad rows"):
        _load(path)
    ps = _load(path, "dataset.on_bad_row=skip")
    assert ps.table["problem"].to_pylist() == ["What is 1 + 1?", "What is 3 + 3?"]
    assert ps.table["source_row"].to_pylist() == [1, 4]
    assert [(b.row, b.reason) for b in ps.bad_rows] == [(2, "not valid UTF-8 (byte 0xe9 at column 4)"),
                                                         (3, "3 fields where the header has 2")]


def test_a_csv_cell_over_a_megabyte_is_read(tmp_path):
    path = tmp_path / "big.csv"
    long = "What is " + "1 + " * 400_000 + "1?"
    path.write_text(f"problem,answer\n{long},400001\nWhat is 2 + 2?,4\n")
    ps = _load(path)
    assert ps.table["problem"].to_pylist()[0] == long and len(long) > 1 << 20 and len(ps.table) == 2


def test_an_unreachable_hub_fails_in_seconds_not_after_retries(tmp_path):
    """No offline flag set: the hub's endpoint (here a closed port on loopback) does not answer, so the
    load goes offline at once and says what to do."""
    import os
    import time

    from conftest import cli

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    t0 = time.perf_counter()
    proc = cli("shard", "dataset.source=hf:openai/gsm8k", "dataset.hf_config=main", f"run.dir={tmp_path / 'run'}",
               check=False, env=env)
    took = time.perf_counter() - t0
    assert proc.returncode == 2 and "could not load the Hugging Face dataset 'openai/gsm8k'" in proc.stderr
    assert "save_to_disk" in proc.stderr and took < 5  # the command's own start-up included


BAD_FILES = {  # name -> (file bytes, the message's words, bad rows in skip mode)
    "dup.jsonl": (b'{"problem": "What is 1 + 1?"}\n{"problem": "What is 2 + 2?"}\n{"problem": "What is 1 + 1?"}\n',
                  "line 3, field 'problem': duplicate id", 1),
    "surrogate.jsonl": (b'{"problem": "What is 1 + 1?"}\n{"problem": "x \\ud800"}\n',
                        "line 2: text that is not valid Unicode", 1),
    "number.jsonl": (b'{"problem": "What is 1 + 1?"}\n{"problem": 42}\n', "line 2, field 'problem': wrong type", 1),
    "bool.jsonl": (b'{"problem": "What is 1 + 1?", "answer": "2"}\n{"problem": "Odd?", "answer": true}\n',
                   "line 2, field 'answer': wrong type: a boolean", 1),
    "cp1252.csv": (b"problem,answer\nWhat is 1 + 1?,2\nCaf\xe9?,3\n", "row 2: not valid UTF-8", 1),
    "ragged.csv": (b"problem,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4,5\n", "row 2: 3 fields where the header has 2", 1),
    "invisible.jsonl": (b'{"problem": "What is 1 + 1?"}\n{"problem": "\\u200b\\u0000"}\n',
                        "line 2, field 'problem': missing or empty problem text", 1),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_rows_through_the_command(name, tmp_path):
    """As a user meets them: exit 2, one line naming file, row and field, nothing written; with
    on_bad_row=skip the row is in the quarantine and the manifest counts it, and not in the shards."""
    from conftest import cli

    content, words, n_bad = BAD_FILES[name]
    src = tmp_path / name
    src.write_bytes(content)
    args = [f"dataset.source={src}", "dataset.fields.id=null", "dataset.fields.solution=null",
            "dataset.fields.answer=" + ("answer" if b"answer" in content else "null")]
    run_dir = tmp_path / "run"
    proc = cli("shard", *args, f"run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {src}") and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "manifest.json").exists()
    cli("shard", *args, f"run.dir={run_dir}", "dataset.on_bad_row=skip")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    quarantined = (run_dir / "quarantine.jsonl").read_text().splitlines()
    assert manifest["quarantine"]["rows"] == len(quarantined) == n_bad
    kept = (2 if name == "dup.jsonl" else 1)
    assert manifest["num_rows"] == sum(s["rows"] for s in manifest["shards"]) == kept


def test_compressed_files_read_as_their_plain_form(tmp_path):
    """.jsonl.gz, .jsonl.zst and .csv.gz give the rows (and the shard bytes) of the plain file."""
    import pyarrow as pa

    src = Path(__file__).resolve().parents[1] / "data/toy/toy_arith_test.jsonl"
    plain = write_shards(dataset_cfg(f"dataset.source={src}"), tmp_path / "plain")
    for suffix, codec in ((".gz", "gzip"), (".zst", "zstd")):
        packed = tmp_path / f"toy.jsonl{suffix}"
        with pa.CompressedOutputStream(str(packed), codec) as out:
            out.write(src.read_bytes())
        m = write_shards(dataset_cfg(f"dataset.source={packed}"), tmp_path / codec)
        assert m["source"]["compression"] == codec and m["num_rows"] == plain["num_rows"]
        assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in plain["shards"]]
    csv_gz = tmp_path / "set.csv.gz"
    with pa.CompressedOutputStream(str(csv_gz), "gzip") as out:
        out.write(b'problem,answer\n"What is 1 + 1?",2\n"Two\nlines",3\n')
    ps = load_problems(dataset_cfg(f"dataset.source={csv_gz}", "dataset.fields.id=null"))
    assert ps.table["problem"].to_pylist() == ["What is 1 + 1?", "Two\nlines"]


def test_a_folder_or_glob_is_one_problem_set_with_rows_per_file(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": f"a{i}", "problem": f"p{i}", "answer": "1"} for i in range(3)])
    write_jsonl(folder / "b.jsonl", [{"id": "b0", "problem": "q0", "answer": "2"}],
                raw_lines=[b'{"id": "b1", "problem": '])
    (folder / "README.md").write_text("not a problem set")
    with pytest.raises(ProblemSetError, match=r"b.jsonl: line 2: malformed JSON"):
        load_problems(dataset_cfg(f"dataset.source={folder}"))
    for source in (folder, folder / "*.jsonl"):
        ps = load_problems(dataset_cfg(f"dataset.source={source}", "dataset.on_bad_row=skip"))
        assert ps.table["id"].to_pylist() == ["a0", "a1", "a2", "b0"]
        assert ps.table["source_file"].to_pylist() == ["a.jsonl"] * 3 + ["b.jsonl"]
        assert ps.table["source_row"].to_pylist() == [1, 2, 3, 1]
        assert [(b.file, b.row) for b in ps.bad_rows] == [("b.jsonl", 2)]
        assert [f["name"] for f in ps.source["files"]] == ["a.jsonl", "b.jsonl"]
    write_jsonl(folder / "c.jsonl", [{"id": "a1", "problem": "again", "answer": "3"}])
    with pytest.raises(ProblemSetError, match=r"c.jsonl: line 1, field 'id': duplicate id 'a1' "
                                              r"\(first seen at a.jsonl, line 2\)"):
        load_problems(dataset_cfg(f"dataset.source='{folder}/[ac].jsonl'"))
    with pytest.raises(ProblemSetError, match="no file matches"):
        load_problems(dataset_cfg(f"dataset.source={folder}/*.parquet"))


def test_a_bad_line_slows_only_its_block(tmp_path, monkeypatch):
    """A whitespace-only line is skipped like a blank one, and only its block is read line by line
    (benchmarks/bench_shard.py times it on 1M rows)."""
    import rsd_batch.problems as problems
    monkeypatch.setattr(problems, "BLOCK_BYTES", 4096)
    rows = [json.dumps({"id": f"r{i}", "problem": f"p{i}", "answer": "1"}) for i in range(400)]
    rows[200] = "   "
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(rows) + "\n")
    ps = load_problems(dataset_cfg(f"dataset.source={path}"))
    assert len(ps.table) == 399 and ps.bad_rows == []
    assert ps.table["source_row"].to_pylist()[199:201] == [200, 202]
