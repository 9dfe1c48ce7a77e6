"""Reading a problem set: sources, field mapping, row-level validation and stable ids.

Every source becomes one Arrow table with the columns
    id (string), problem (string), answer (string, null when there is no gold), source_row (int64)
and, when the source has other columns, `metadata` (a struct of them, passed through to the output).

Bad input never disappears silently: with `on_bad_row=error` the first bad row stops the job with
one message naming the file, the row and the field; with `on_bad_row=skip` bad rows are returned as
`BadRow`s for the quarantine file. This module knows nothing about models.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import AnswerFormat, DatasetConfig, OnBadRow, OnDuplicateId
from .errors import UserError
from .grading import gold_answer

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
           ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
HINT_SKIP = "or set dataset.on_bad_row=skip to quarantine such rows"


class ProblemSetError(UserError, ValueError):
    """A problem set that cannot be read as configured; the message says where and what to do."""


@dataclass
class BadRow:
    row: int  # 1-based: the line of a JSON-lines file, else the data row
    field: Optional[str]
    reason: str
    hint: str
    raw: Any = None  # the row as read, for the quarantine file

    def describe(self, source: str, unit: str) -> str:
        where = f"{source}: {unit} {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}. {self.hint}"


@dataclass
class ProblemSet:
    table: pa.Table
    bad_rows: list[BadRow]
    source: dict  # path/name, format, sha256 or fingerprint: what the manifest records


def load_problems(cfg: DatasetConfig) -> ProblemSet:
    fmt = detect_format(cfg)
    if fmt == "hf":
        raw, source = _read_hub(cfg)
    elif fmt == "disk":
        raw, source = _read_disk(cfg)
    else:
        path = Path(cfg.source)
        data = path.read_bytes()
        source = {"path": str(path.resolve()), "format": fmt,
                  "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        raw = _read_file(path, data, fmt, cfg)
    table, bad = raw
    unit = "line" if fmt == "jsonl" else "row"
    if not [c for c in table.column_names if c != "source_row"]:
        _no_rows(source.get("path") or source.get("name"), bad, unit)
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
        bad = [b for b in bad if b.row <= (int(table["source_row"][-1].as_py()) if len(table) else 0)]
    table, more_bad = _map_fields(table, cfg)
    bad = sorted(bad + more_bad, key=lambda b: b.row)
    table, dup_bad, dropped = _assign_ids(table, cfg, unit)
    bad += dup_bad
    name = source.get("path") or source.get("name")
    if bad and cfg.on_bad_row == OnBadRow.error:
        first = bad[0]
        msg = first.describe(name, unit)
        if len(bad) > 1:
            msg += f" ({len(bad) - 1} more bad rows after this one.)"
        raise ProblemSetError(msg)
    if len(table) == 0:
        raise ProblemSetError(f"{name}: no usable rows (read {len(bad)} bad ones). "
                              "Check dataset.source and dataset.fields.")
    source["unit"] = unit
    return ProblemSet(table=table, bad_rows=sorted(bad + dropped, key=lambda b: b.row), source=source)


def _no_rows(name: str, bad: list[BadRow], unit: str) -> None:
    """A source with no usable row at all: say why (empty, blank, every line bad, not this format)."""
    if not bad:
        raise ProblemSetError(f"{name}: no rows (the file is empty or every line is blank). Check "
                              "dataset.source.")
    first = bad[0]
    if first.field is None and first.reason.startswith("malformed JSON"):
        shown = str(first.raw)[:80]
        raise ProblemSetError(f"{name}: not JSON lines: {unit} {first.row} is {shown!r} ({first.reason}). "
                              "If it is another format (a CSV?), name the file for it or set "
                              "dataset.format.")
    raise ProblemSetError(f"{name}: no usable rows: every one of the {len(bad)} is bad; the first: "
                          f"{first.describe(name, unit)}")


def detect_format(cfg: DatasetConfig) -> str:
    if cfg.format != "auto":
        if cfg.format not in set(FORMATS.values()) | {"disk", "hf"}:
            raise ProblemSetError(f"dataset.format={cfg.format!r} is not one of "
                                  f"auto, {', '.join(sorted(set(FORMATS.values())))}, disk, hf.")
        return cfg.format
    if cfg.source.startswith("hf:"):
        return "hf"
    path = Path(cfg.source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "disk"
        raise ProblemSetError(f"{path}: a folder, but not one written by datasets' save_to_disk. "
                              "Point dataset.source at a file inside it.")
    if not path.exists():
        raise ProblemSetError(f"{path}: no such file. Set dataset.source to a local file "
                              "(.jsonl .json .parquet .csv .arrow), a save_to_disk folder, "
                              "or hf:<dataset name> for the Hugging Face hub.")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ProblemSetError(f"{path}: unknown file type '{path.suffix}'. Use one of "
                              f"{', '.join(sorted(FORMATS))}, or set dataset.format explicitly.")
    return fmt


# ---------------------------------------------------------------- reading each kind of source


def _read_file(path: Path, data: bytes, fmt: str, cfg: DatasetConfig):
    if fmt == "json" and data.lstrip()[:1] != b"[":
        fmt = "jsonl"  # a .json file holding JSON lines
    if fmt == "jsonl":
        return _read_jsonl(data)
    if fmt == "json":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ProblemSetError(f"{path}: not UTF-8 at byte {e.start}. Re-encode the file as "
                                  "UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
        except json.JSONDecodeError as e:
            raise ProblemSetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: "
                                  f"{e.msg}. Fix the file, or convert it to JSON lines.") from None
        if not isinstance(rows, list):
            raise ProblemSetError(f"{path}: a .json problem set must be a list of objects.")
        return _rows_to_table(list(enumerate(rows, 1)), cfg, [])
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(pa.BufferReader(data))
        elif fmt == "csv":
            return _read_csv(data, cfg)
        else:
            table = _read_ipc(data)
    except ProblemSetError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ProblemSetError(f"{path}: cannot be read as {fmt}: {e}. Check the file type, "
                              "or set dataset.format.") from None
    return table.append_column("source_row", pa.array(np.arange(1, len(table) + 1))), []


def _read_ipc(data: bytes) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all()  # datasets writes streams


def _read_csv(data: bytes, cfg: DatasetConfig) -> tuple[pa.Table, list[BadRow]]:
    """One CSV file: lines that are not UTF-8 and ragged rows become bad rows naming their data row
    (line − 1), so they can be quarantined; a cell of any size fits (the file is one block)."""
    import pyarrow.csv as pcsv

    bad: list[BadRow] = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines[1:], 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadRow(n, None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})",
                              f"Re-encode the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8), {HINT_SKIP}",
                              raw=line.decode("utf-8", "replace")))
            lines[n] = b""  # read as an empty line, which the parser skips
    if bad:
        data = b"\n".join(lines)
    # The parser numbers the rows it reads (the header is 1) and skips empty lines: map back to data rows.
    nonempty = [n for n, line in enumerate(lines[1:], 1) if line.strip(b"\r")]

    def ragged(row) -> str:
        k = (row.number or 0) - 2
        n = nonempty[k] if 0 <= k < len(nonempty) else 0
        bad.append(BadRow(n, None, f"{row.actual_columns} fields where the header has {row.expected_columns}",
                          f"Fix the quoting or the separators of that row, {HINT_SKIP}", raw=row.text))
        return "skip"

    # Mapped fields are text in a CSV whatever they look like (an id "007" must stay "007").
    text_cols = {c: pa.string() for c in (cfg.fields.problem, cfg.fields.answer, cfg.fields.id) if c}
    table = pcsv.read_csv(
        pa.BufferReader(data),
        read_options=pcsv.ReadOptions(use_threads=False, block_size=min(max(len(data) + 1, 1 << 20), 2**31 - 1)),
        parse_options=pcsv.ParseOptions(invalid_row_handler=ragged),
        convert_options=pcsv.ConvertOptions(column_types=text_cols))
    # Data row numbers of the rows read: every non-empty line after the header but the bad ones.
    skipped = {b.row for b in bad}
    rows = [n for n in nonempty if n not in skipped]
    if len(rows) != len(table):  # cells spanning lines: count rows instead
        rows = list(range(1, len(table) + 1))
    return table.append_column("source_row", pa.array(rows, pa.int64())), sorted(bad, key=lambda b: b.row)


def _read_jsonl(data: bytes):
    """Fast path with Arrow's reader; on any complaint, a line-by-line pass that names the line."""
    import pyarrow.json as pjson
    try:
        data.decode("utf-8")  # Arrow's reader lets bad bytes through; the slow path names the line
        table = pjson.read_json(pa.BufferReader(data),
                                read_options=pjson.ReadOptions(block_size=16 << 20))
        lines = _nonblank_line_numbers(data)
        if len(table) == len(lines):
            return table.append_column("source_row", pa.array(lines)), []
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    rows, bad = [], []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadRow(n, None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                                       f"{e.start + 1})",
                              f"Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), {HINT_SKIP}",
                              raw=line.decode("utf-8", "replace")))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append(BadRow(n, None, f"malformed JSON ({e.msg} at column {e.colno})",
                              f"Fix or remove the line, {HINT_SKIP}", raw=text))
            continue
        if not isinstance(obj, dict):
            bad.append(BadRow(n, None, f"a JSON {type(obj).__name__}, not an object",
                              f"Each line must be one JSON object, {HINT_SKIP}", raw=text))
            continue
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): JSON allows it, Unicode does not
            bad.append(BadRow(n, None, f"text that is not valid Unicode (a lone surrogate, "
                                       f"{e.object[e.start:e.end].encode('utf-8', 'backslashreplace').decode()})",
                              f"Fix or remove the line, {HINT_SKIP}", raw=text))
            continue
        rows.append((n, obj))
    return _rows_to_table(rows, None, bad)


def _nonblank_line_numbers(data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(buf) and buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.array([], dtype=np.int64)
    lengths = ends - starts
    # A line of only "\r" or nothing is blank; whitespace-only lines are rare enough to ignore here.
    nonblank = lengths > 0
    cr_only = (lengths == 1) & (buf[np.minimum(starts, max(len(buf) - 1, 0))] == 13)
    return (np.flatnonzero(nonblank & ~cr_only) + 1).astype(np.int64)


def _rows_to_table(rows: list[tuple[int, dict]], cfg: Optional[DatasetConfig], bad: list[BadRow]):
    """Python objects -> one Arrow table; a column Arrow cannot type (mixed types) becomes JSON text."""
    names: dict[str, None] = {}
    for _, obj in rows:
        if not isinstance(obj, dict):
            continue
        names.update(dict.fromkeys(obj))
    good = []
    for n, obj in rows:
        if not isinstance(obj, dict):
            bad.append(BadRow(n, None, f"a JSON {type(obj).__name__}, not an object",
                              f"Each row must be one JSON object, {HINT_SKIP}", raw=obj))
        else:
            good.append((n, obj))
    columns = {}
    for name in names:
        values = [obj.get(name) for _, obj in good]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types: mapped fields are then checked row by row, metadata keeps JSON text.
            columns[name] = _mixed_column(values)
    columns["source_row"] = pa.array([n for n, _ in good], type=pa.int64())
    return pa.table(columns), bad


def _mixed_column(values: list) -> pa.StructArray:
    """A column whose rows have different JSON types, as (type name, JSON text) per row."""
    return pa.StructArray.from_arrays(
        [pa.array([None if v is None else type(v).__name__ for v in values], pa.string()),
         pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                  pa.string())],
        names=["__type__", "__json__"])


def _is_mixed(arr) -> bool:
    t = arr.type
    return pa.types.is_struct(t) and [f.name for f in t] == ["__type__", "__json__"]


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub's endpoint answers at all: when it does not, the load goes offline at once
    (the local cache only) instead of spending half a minute in retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _read_hub(cfg: DatasetConfig):
    import datasets
    name = cfg.source[3:]
    if not _hub_reachable():
        import huggingface_hub.constants

        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(name, cfg.hf_config, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - any failure here has the same remedy
        raise ProblemSetError(
            f"could not load the Hugging Face dataset '{name}' (config {cfg.hf_config!r}, split "
            f"{cfg.split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Without network access, save it where you have one "
            "(datasets.load_dataset(...).save_to_disk(DIR)) and set dataset.source=DIR, "
            "or point dataset.source at a local .jsonl/.parquet file.") from None
    return _dataset_table(ds), {"name": cfg.source, "format": "hf", "split": cfg.split,
                                "config": cfg.hf_config, "fingerprint": ds._fingerprint}


def _read_disk(cfg: DatasetConfig):
    import datasets
    ds = datasets.load_from_disk(cfg.source)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ProblemSetError(f"{cfg.source}: no split {cfg.split!r}; it has "
                                  f"{', '.join(ds)}. Set dataset.split.")
        ds = ds[cfg.split]
    return _dataset_table(ds), {"path": str(Path(cfg.source).resolve()), "format": "disk",
                                "split": cfg.split, "fingerprint": ds._fingerprint}


def _dataset_table(ds):
    table = ds.with_format("arrow")[:]  # respects an indices mapping, unlike ds.data
    return table.append_column("source_row", pa.array(np.arange(1, len(table) + 1))), []


# ---------------------------------------------------------------- field mapping and validation


def _map_fields(table: pa.Table, cfg: DatasetConfig) -> tuple[pa.Table, list[BadRow]]:
    f = cfg.fields
    columns = [c for c in table.column_names if c != "source_row"]
    for role, col in (("problem", f.problem), ("answer", f.answer), ("id", f.id)):
        if col is not None and col not in columns:
            raise ProblemSetError(
                f"{cfg.source}: no column '{col}' for dataset.fields.{role}; the columns are "
                f"{', '.join(columns)}. Set dataset.fields.{role}=<column>"
                + (" or null." if role != "problem" else "."))
    rows = table["source_row"].combine_chunks()
    bad: dict[int, BadRow] = {}  # by table index: one complaint per row is enough

    def flag(mask, field, reason, hint):  # noqa: ANN001
        for i in np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)):
            bad.setdefault(int(i), BadRow(int(rows[i].as_py()), field, reason, hint))

    problem = _as_text(table[f.problem].combine_chunks(), f.problem, rows, bad, accept="problem")
    # Blank: nothing but whitespace, NULs, zero-width or other invisible characters.
    visible = pc.replace_substring_regex(problem, r"[\p{Cc}\p{Cf}\p{Z}]", "")
    empty = pc.or_kleene(pc.is_null(problem), pc.equal(visible, ""))
    flag(pc.fill_null(empty, True), f.problem, "missing or empty problem text",
         f"Fill it in or drop the row, {HINT_SKIP}")
    out = {"problem": problem}
    keep_raw_answer = False
    if f.answer is not None:
        answer = _as_text(table[f.answer].combine_chunks(), f.answer, rows, bad, accept="answer")
        if cfg.answer_format != AnswerFormat.plain:
            # The field holds a rationale: grade against what it concludes, keep the rest as metadata.
            answer = pa.array([gold_answer(a, cfg.answer_format) for a in answer.to_pylist()],
                              pa.string())
            keep_raw_answer = True
        else:
            # An empty gold is no gold (GaoKao-2023-En has two): the row is run but not graded.
            answer = pc.if_else(pc.equal(pc.utf8_trim_whitespace(answer), ""), pa.scalar(None, pa.string()),
                                answer)
        out["answer"] = answer
    else:
        out["answer"] = pa.nulls(len(table), pa.string())
    if f.id is not None:
        ids = _as_text(table[f.id].combine_chunks(), f.id, rows, bad, accept="id")
        flag(pc.fill_null(pc.or_kleene(pc.is_null(ids), pc.equal(ids, "")), True), f.id,
             "missing or empty id", f"Give every row an id, or set dataset.fields.id=null to hash "
             f"the problem text, {HINT_SKIP}")
        out["id"] = ids
    out["source_row"] = rows
    meta_cols = [c for c in columns if c not in (f.problem, f.answer, f.id)] \
        if f.metadata is None else list(f.metadata)
    if keep_raw_answer and f.answer not in meta_cols:
        meta_cols.append(f.answer)
    for c in meta_cols:
        if c not in columns:
            raise ProblemSetError(f"{cfg.source}: dataset.fields.metadata names '{c}', which is "
                                  f"not a column ({', '.join(columns)}).")
    if meta_cols:
        arrays = [table[c].combine_chunks() for c in meta_cols]
        arrays = [_mixed_to_json(a) if _is_mixed(a) else a for a in arrays]
        out["metadata"] = pa.StructArray.from_arrays(arrays, names=meta_cols)
    mapped = pa.table(out)
    bad_rows = [bad[i] for i in sorted(bad)]
    if bad:
        for b, i in zip(bad_rows, sorted(bad)):
            b.raw = _row_as_dict(table, i)
        keep = np.ones(len(table), dtype=bool)
        keep[sorted(bad)] = False
        mapped = mapped.filter(pa.array(keep))
    return mapped, bad_rows


# What a mapped field may hold: a problem is text; an id text or a whole number; a gold answer text,
# a number or a list of them (joined with ", "). A boolean is never a problem, an id or an answer.
ACCEPT = {"problem": ("str",), "id": ("str", "int"), "answer": ("str", "int", "float", "list")}


def _as_text(arr: pa.Array, name: str, rows, bad: dict, accept: str) -> pa.Array:
    """A mapped column as strings; a value of a kind the field does not take is a bad row."""
    hint = f"Fix the value, or map another column with dataset.fields, {HINT_SKIP}"
    kinds_ok = ACCEPT[accept]
    t = arr.type
    if _is_mixed(arr):
        kinds = arr.field("__type__").to_pylist()
        raw = arr.field("__json__").to_pylist()
        values = []
        for i, (k, v) in enumerate(zip(kinds, raw)):
            val = None if v is None else json.loads(v)
            if k is None or k in kinds_ok:
                values.append(_scalar_text(val))
            else:
                bad.setdefault(i, BadRow(int(rows[i].as_py()), name,
                                         f"wrong type: a {_json_kind(k)} where {_wanted(accept)} was expected", hint))
                values.append(None)
        return pa.array(values, pa.string())
    if pa.types.is_dictionary(t):  # a pandas Categorical column: its values are what count
        return _as_text(arr.cast(t.value_type), name, rows, bad, accept)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return arr.cast(pa.string())
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if (pa.types.is_integer(t) and "int" in kinds_ok) or (pa.types.is_floating(t) and "float" in kinds_ok):
        return arr.cast(pa.string())
    if "list" in kinds_ok and (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return pa.array([_scalar_text(v) for v in arr.to_pylist()], pa.string())
    # A whole column of the wrong type: every row with a value is bad.
    for i in np.flatnonzero(np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))):
        bad.setdefault(int(i), BadRow(int(rows[int(i)].as_py()), name,
                                      f"wrong type: a {_json_kind(str(t))} where {_wanted(accept)} was expected",
                                      hint))
    return pa.nulls(len(arr), pa.string())


def _wanted(accept: str) -> str:
    return {"problem": "text", "id": "text or a whole number",
            "answer": "text, a number or a list"}[accept]


def _scalar_text(v: Any) -> Optional[str]:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def _json_kind(k: str) -> str:
    if k.startswith(("int", "uint")):
        return "number"
    return {"dict": "JSON object", "list": "JSON list", "bool": "boolean", "float": "number",
            "double": "number"}.get(k, k)


def _mixed_to_json(arr: pa.Array) -> pa.Array:
    return arr.field("__json__")


def _row_as_dict(table: pa.Table, i: int) -> dict:
    row = table.slice(i, 1).to_pylist()[0]
    return {k: (json.loads(v["__json__"]) if isinstance(v, dict) and "__json__" in v and v["__json__"]
                else v) for k, v in row.items()}


def _assign_ids(table: pa.Table, cfg: DatasetConfig, unit: str) -> tuple[pa.Table, list[BadRow], list[BadRow]]:
    """Ids for every row; returns (table, bad rows, rows dropped by on_duplicate_id=keep_first)."""
    if "id" not in table.column_names:
        # Stable across runs and machines: the problem text decides the id.
        ids = pa.array([hashlib.sha256(p.encode("utf-8")).hexdigest()[:16]
                        for p in table["problem"].to_pylist()], pa.string())
        table = table.append_column("id", ids)
    table = table.select(["id", "problem", "answer", "source_row"]
                         + (["metadata"] if "metadata" in table.column_names else []))
    ids = table["id"].combine_chunks()
    counts = pc.value_counts(ids)
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_values) == 0:
        return table, [], []
    dup_mask = pc.is_in(ids, value_set=dup_values).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(dup_mask)
    rows = table["source_row"].to_numpy()
    seen: dict[str, int] = {}
    later: list[tuple[int, str, int]] = []  # (table index, id, first row)
    for i in idx:
        key = ids[int(i)].as_py()
        if key in seen:
            later.append((int(i), key, seen[key]))
        else:
            seen[key] = int(rows[i])
    how = cfg.on_duplicate_id
    if how == OnDuplicateId.number:
        new = ids.to_pylist()
        k: dict[str, int] = {}
        for i, key, _ in later:
            k[key] = k.get(key, 1) + 1
            new[i] = f"{key}#{k[key]}"
        return table.set_column(0, "id", pa.array(new, pa.string())), [], []
    bad = [BadRow(int(rows[i]), cfg.fields.id or "problem",
                  f"duplicate id '{key}' (first seen at {unit} {first})"
                  + ("" if cfg.fields.id else ": the same problem text appears twice"),
                  "Set dataset.on_duplicate_id=keep_first to keep the first and quarantine the "
                  "rest, or =number to suffix later ones with #2, #3, ...",
                  raw=table.slice(i, 1).to_pylist()[0]) for i, key, first in later]
    # A later duplicate is never kept: on_duplicate_id=keep_first drops it quietly, otherwise it is a bad
    # row (the job stops, or on_bad_row=skip quarantines it) — not both quarantined and sharded.
    keep = np.ones(len(table), dtype=bool)
    keep[[i for i, _, _ in later]] = False
    table = table.filter(pa.array(keep))
    if how == OnDuplicateId.keep_first:
        for b in bad:
            b.hint = "dropped by dataset.on_duplicate_id=keep_first"
        return table, [], bad
    return table, bad, []
