"""Problem sets that pin the bytes shard writes: the benchmark sets in ../shared/data (read-only; the
toy set is retrained with its world, so it is not one of them) and generated files with every kind of
column, bad row and duplicate. `tests/data/shard_hashes.json` holds the sha256 of every shard, of the
quarantine file and of the manifest (source path left out) as the in-memory reader wrote them; the
streaming reader must write the same bytes (tests/test_shards.py)."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"id": f"p{i:06d}", "problem": f"What is {rng.randint(1, 999)} + {rng.randint(1, 999)}? "
               + "x" * rng.randint(0, 300), "answer": str(rng.randint(0, 2000)),
               "level": rng.randint(1, 5), "score": rng.random(), "tags": ["a", "b"][: rng.randint(0, 2)],
               "extra": {"k": rng.randint(0, 9)}}
        if i % 7 == 0:
            row["note"] = None
        rows.append(row)
    return rows


def build(folder: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (source file, Hydra overrides). Every file is a pure function of its seed."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[str, list[str]]] = {}
    for name, preset, extra in [("math500", "math500", ["dataset.shard_size=64"]),
                                ("gsm8k", "gsm8k", ["dataset.num_shards=7"]),
                                ("olympiad", "olympiadbench", []), ("minerva", "minerva_math", []),
                                ("gaokao", "gaokao2023en", ["dataset.shard_size=33"])]:
        cases[name] = ("", [f"dataset={preset}", *extra])
    rows = _rows(6000, 1)
    clean = folder / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases["clean_ids"] = (str(clean), ["dataset.shard_size=500"])
    cases["clean_hash_ids"] = (str(clean), ["dataset.fields.id=null", "dataset.num_shards=5", "dataset.on_duplicate_id=number"])
    cases["clean_limit"] = (str(clean), ["dataset.limit=1234", "dataset.shard_size=100"])
    dirty_lines = [json.dumps(r) for r in rows[:3000]]
    dirty_lines[10] = "   "
    dirty_lines[20] = '{"id": "bad", "problem": '
    dirty_lines[30] = json.dumps({"id": "p000031", "problem": ""})
    dirty_lines[40] = json.dumps({"id": "p000005", "problem": "a duplicate id", "answer": "1"})
    dirty_lines[2500] = json.dumps({"id": "p000100", "problem": "a late duplicate", "answer": "2"})
    dirty_lines[50] = json.dumps({"id": "p000051", "problem": 42})
    dirty_lines[60] = "[1, 2]"
    dirty_lines[1500] = json.dumps({"id": "p001501", "problem": "mixed level", "level": "high"})
    dirty = folder / "dirty.jsonl"
    dirty.write_text("\n".join(dirty_lines) + "\n")
    cases["dirty_skip"] = (str(dirty), ["dataset.on_bad_row=skip", "dataset.shard_size=400"])
    cases["dirty_number"] = (str(dirty), ["dataset.on_bad_row=skip", "dataset.on_duplicate_id=number"])
    cases["dirty_keep_first"] = (str(dirty), ["dataset.on_bad_row=skip", "dataset.on_duplicate_id=keep_first"])
    flat = [{k: v for k, v in r.items() if k not in ("tags", "extra", "note")} for r in rows[:2000]]
    flat[3]["problem"] = "a cell\nover two lines, with \"quotes\""
    flat[4]["problem"] = "y" * (1 << 20) + " a big cell"
    csv_path = folder / "set.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    cases["csv"] = (str(csv_path), ["dataset.shard_size=300"])
    table = pa.Table.from_pylist(flat)
    table = table.set_column(table.schema.get_field_index("level"), "level",
                             table["level"].cast(pa.string()).dictionary_encode())
    pq_path = folder / "set.parquet"
    pq.write_table(table, pq_path, row_group_size=333)
    cases["parquet"] = (str(pq_path), ["dataset.shard_size=250"])
    arrow_path = folder / "set.arrow"
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=150)
    cases["arrow"] = (str(arrow_path), ["dataset.num_shards=3"])
    return cases


def overrides(source: str, extra: list[str]) -> list[str]:
    base = [] if not source else ["dataset=math500", f"dataset.source={source}", "dataset.name=corpus",
                                  "dataset.fields.id=id", "dataset.fields.solution=null"]
    if source.endswith(".csv") or source.endswith(".parquet") or source.endswith(".arrow"):
        base.append("dataset.fields.metadata=null")
    return base + extra


def shard_hashes(run_dir: Path, manifest: dict) -> dict:
    from rsd_batch.files import sha256_file

    m = {k: v for k, v in manifest.items() if k != "source"}
    m["source"] = {k: v for k, v in manifest["source"].items() if k != "path"}
    m["dataset"] = {k: v for k, v in manifest["dataset"].items() if k != "source"}
    out = {"manifest": json.dumps(m, sort_keys=True),
           "shards": [sha256_file(run_dir / s["path"]) for s in manifest["shards"]]}
    q = run_dir / "quarantine.jsonl"
    if q.exists():
        lines = [json.loads(x) for x in q.read_text().splitlines()]
        for x in lines:
            x.pop("source", None)
        out["quarantine"] = lines
    return out
