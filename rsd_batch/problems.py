"""Reading a problem set: sources, field mapping, row-level validation and stable ids.

Every source becomes one Arrow table with the columns
    id (string), problem (string), answer (string, null when there is no gold), source_row (int64)
and, when the source has other columns, `metadata` (a struct of them, passed through to the output).

A source is read as a stream of blocks (about 32 MB of text, or one record batch), each mapped and
validated on its own, so memory does not grow with the file and one bad line sends only its block
down the line-by-line path. A set of several files (a folder, a glob) adds `source_file`.
`rsd_batch.staging` puts the blocks together (duplicate ids, one schema); `load_problems` is that,
in memory.

Bad input never disappears silently: with `on_bad_row=error` the first bad row stops the job with
one message naming the file, the row and the field; with `on_bad_row=skip` bad rows are returned as
`BadRow`s for the quarantine file. This module knows nothing about models.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import AnswerFormat, DatasetConfig
from .errors import UserError
from .grading import gold_answer

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
           ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}  # text formats only: .jsonl.gz, .jsonl.zst, .csv.gz, ...
BLOCK_BYTES = 32 << 20  # text read per block: big enough for Arrow's readers to run at full speed
BATCH_ROWS = 65_536  # rows per block of a columnar source (parquet, arrow, a datasets folder)
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
    file: Optional[str] = None  # the file it is in, when the problem set is several files

    def describe(self, source: str, unit: str) -> str:
        where = f"{self.file or source}: {unit} {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}. {self.hint}"


@dataclass
class ProblemSet:
    table: pa.Table
    bad_rows: list[BadRow]
    source: dict  # path/name, format, sha256 or fingerprint: what the manifest records


def load_problems(cfg: DatasetConfig) -> ProblemSet:
    """The whole problem set in memory (tests, pilots); `rsd-batch shard` streams it instead."""
    from .staging import stage

    staged = stage(open_problems(cfg), cfg)
    batches = list(staged.batches())
    table = pa.concat_tables(batches) if batches else None
    return ProblemSet(table=table.combine_chunks(), bad_rows=staged.bad_rows, source=staged.source)


@dataclass
class Block:
    """Rows of one block, mapped and validated: `table` has id, problem, answer, source_row
    (, source_file)(, metadata); `json_fields` are metadata fields held as JSON text (mixed types)."""
    table: pa.Table
    bad: list[BadRow]
    json_fields: set = field(default_factory=set)


@dataclass
class ProblemSource:
    """Where the rows come from and what the manifest records of it; `blocks()` reads them."""
    identity: Callable[[], dict]  # path/name, format, sha256 or fingerprint: files hash on a thread
    name: str
    unit: str  # "line" (JSON lines) or "row"
    read: Callable[[], Iterator[tuple[pa.Table, list[BadRow]]]]  # raw blocks with source_row
    # The row count when it is known before parsing (a hint: pass one checks it, and a wrong one only
    # costs the shards being cut again); None when only reading tells.
    rows: Callable[[], Optional[int]] = lambda: None

    @property
    def source(self) -> dict:
        return self.identity()

    def blocks(self, cfg: DatasetConfig) -> Iterator[Block]:
        columns: Optional[list[str]] = None  # the first block with rows decides the columns
        bad_before: list[BadRow] = []
        seen = 0
        for raw, bad in _ahead(self.read()):
            if cfg.limit is not None and seen + len(raw) >= cfg.limit:
                raw = raw.slice(0, cfg.limit - seen)
                last = int(raw["source_row"][-1].as_py()) if len(raw) else 0
                bad = [b for b in bad if b.row <= last]
            seen += len(raw)
            names = [c for c in raw.column_names if c not in ("source_row", "source_file")]
            if columns is None:
                if not names:
                    bad_before += bad
                    continue
                columns = names
                _check_fields(cfg, columns, self.name)
            mapped, more_bad, json_fields = _map_fields(raw, cfg, columns)
            mapped = _with_ids(mapped, cfg)
            if bad_before:
                bad, bad_before = bad_before + bad, []
            yield Block(mapped, sorted(bad + more_bad, key=lambda b: (b.file or "", b.row)), json_fields)
            if cfg.limit is not None and seen >= cfg.limit:
                return
        if columns is None:
            _no_rows(self.name, bad_before, self.unit)


def _ahead(blocks: Iterator, depth: int = 1) -> Iterator:
    """Read the next block on a thread while this one is checked: Arrow's parser lets go of the GIL,
    so the two cores overlap parsing with validation, hashing and writing."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in blocks:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="rsd-read-ahead")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def open_problems(cfg: DatasetConfig) -> ProblemSource:
    """The problem set named by `dataset.source`, ready to stream; its identity is known already
    (files are hashed first), so an unchanged set can be recognised without parsing it."""
    fmt = detect_format(cfg)
    if fmt in ("hf", "disk"):
        ds, source = _read_hub(cfg) if fmt == "hf" else _read_disk(cfg)
        return ProblemSource(lambda: source, source.get("path", cfg.source), "row", lambda: _dataset_blocks(ds),
                             rows=lambda: _limited(len(ds), cfg))
    files = source_files(cfg.source)
    unit = "line" if fmt in ("jsonl", "json") else "row"
    # The files' sha256 is computed beside the parsing (hashlib lets go of the GIL): half a second per GB.
    # JSON lines are counted in the same read, so the shards can be planned before the file is parsed.
    count = fmt == "jsonl" and not any(COMPRESSION.get(f.suffix.lower()) for f in files)
    pool = ThreadPoolExecutor(1)
    hashing = pool.submit(lambda: [_file_identity(f, count) for f in files])
    pool.shutdown(wait=False)

    def rows() -> Optional[int]:
        if fmt in ("parquet", "arrow"):
            counts = [_columnar_rows(f, fmt) for f in files]
        elif count:
            counts = [h["_rows"] for h in hashing.result()]
        else:
            return None
        return None if None in counts else _limited(sum(counts), cfg)
    if len(files) == 1:
        path = files[0]
        compression = COMPRESSION.get(path.suffix.lower())

        def identity() -> dict:
            found = {k: v for k, v in hashing.result()[0].items() if k != "_rows"}
            source = {"path": str(path.resolve()), "format": fmt, **found}
            return {**source, "compression": compression} if compression else source
        return ProblemSource(functools.cache(identity), str(path), unit,
                             lambda: _file_blocks(path, fmt, cfg, None), rows)
    base = Path(cfg.source)
    base = base if base.is_dir() else Path(glob.escape(cfg.source)).parent
    names = [str(f.relative_to(base)) if f.is_relative_to(base) else str(f) for f in files]

    def identities() -> dict:
        hashes = [{k: v for k, v in h.items() if k != "_rows"} for h in hashing.result()]
        listing = "".join(f"{n} {h['sha256']}\n" for n, h in zip(names, hashes))
        return {"path": str(Path(cfg.source).resolve()) if base == Path(cfg.source) else cfg.source,
                "format": fmt, "files": [{"name": n, **h} for n, h in zip(names, hashes)],
                "sha256": hashlib.sha256(listing.encode()).hexdigest(),
                "bytes": sum(h["bytes"] for h in hashes)}

    def read() -> Iterator[tuple[pa.Table, list[BadRow]]]:
        for f, n in zip(files, names):
            yield from _file_blocks(f, fmt, cfg, n)
    return ProblemSource(functools.cache(identities), cfg.source, unit, read, rows)


def source_files(source: str) -> list[Path]:
    """The files of a problem set: one file, every problem-set file in a folder, or a glob's matches."""
    path = Path(source)
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source) if Path(p).is_file())
        if not files:
            raise ProblemSetError(f"{source}: no file matches this pattern. Check dataset.source.")
    elif path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".") and _file_format(p) is not None)
        if not files:
            raise ProblemSetError(f"{path}: a folder with no problem-set file in it (and not one written "
                                  "by datasets' save_to_disk). Point dataset.source at a file or a glob.")
    else:
        return [path]
    kinds = {_file_format(f) for f in files}
    if len(kinds) != 1:
        raise ProblemSetError(f"{source}: the files are of different formats ({', '.join(sorted(map(str, kinds)))}); "
                              "one problem set is one format. Narrow dataset.source with a glob.")
    return files


def _file_format(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
        fmt = FORMATS.get(suffixes[-1]) if suffixes else None
        return fmt if fmt in ("jsonl", "json", "csv") else None
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _file_identity(path: Path, count: bool = False) -> dict:
    """sha256 and size; with `count`, also `_rows`: the lines that open an object (a line that starts
    with "{"), which is the row count of a clean JSON-lines file, blank lines and all."""
    h, n, rows, last = hashlib.sha256(), 0, 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            n += len(chunk)
            if count:
                rows += chunk.count(b"\n{") + (last == b"\n" and chunk[:1] == b"{")
                last = chunk[-1:]
    return {"sha256": h.hexdigest(), "bytes": n, **({"_rows": rows} if count else {})}


def _columnar_rows(path: Path, fmt: str) -> Optional[int]:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(str(path)).metadata.num_rows
        with pa.memory_map(str(path), "r") as src:
            reader = pa.ipc.open_file(src)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError):
        return None  # a stream file, or not readable: reading says which


def _limited(rows: int, cfg: DatasetConfig) -> int:
    return rows if cfg.limit is None else min(rows, cfg.limit)


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
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return "disk"
    if not path.exists() and not any(ch in cfg.source for ch in "*?["):
        raise ProblemSetError(f"{path}: no such file. Set dataset.source to a local file "
                              "(.jsonl .json .parquet .csv .arrow, optionally .gz/.zst for text), "
                              "a folder or glob of such files, a save_to_disk folder, "
                              "or hf:<dataset name> for the Hugging Face hub.")
    files = source_files(cfg.source)
    fmt = _file_format(files[0])
    if fmt is None:
        raise ProblemSetError(f"{files[0]}: unknown file type '{''.join(files[0].suffixes[-2:])}'. Use one of "
                              f"{', '.join(sorted(FORMATS))} (text ones also .gz or .zst), or set "
                              "dataset.format explicitly.")
    return fmt


# ---------------------------------------------------------------- reading each kind of source


def _file_blocks(path: Path, fmt: str, cfg: DatasetConfig, name: Optional[str]):
    """Raw blocks of one file, each with `source_row` (and `source_file` when `name` is given)."""
    for table, bad in _raw_file_blocks(path, fmt, cfg):
        if name is not None:
            table = table.append_column("source_file", pa.array([name] * len(table), pa.string()))
            for b in bad:
                b.file = name
        yield table, bad


def _raw_file_blocks(path: Path, fmt: str, cfg: DatasetConfig):
    compression = COMPRESSION.get(path.suffix.lower())
    if fmt == "json":
        with pa.input_stream(str(path), compression=compression) as f:
            head = f.read(1 << 16)
        if head.lstrip()[:1] != b"[":
            fmt = "jsonl"  # a .json file holding JSON lines
    try:
        if fmt == "jsonl":
            for data, line, newlines in _text_blocks(path, compression, _after_last_newline):
                table, bad = _read_jsonl(data, newlines)
                yield _shift_rows(table, bad, line - 1)
        elif fmt == "csv":
            yield from _csv_blocks(path, compression, cfg)
        elif fmt == "json":
            with pa.input_stream(str(path), compression=compression) as f:
                yield _read_json_array(path, f.read(), cfg)
        elif fmt == "parquet":
            import pyarrow.parquet as pq
            n = 0
            for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=BATCH_ROWS):
                yield _numbered(pa.Table.from_batches([batch]), n), []
                n += batch.num_rows
        else:
            yield from _ipc_blocks(path)
    except ProblemSetError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ProblemSetError(f"{path}: cannot be read as {fmt}: {e}. Check the file type, "
                              "or set dataset.format.") from None


def _numbered(table: pa.Table, before: int) -> pa.Table:
    return table.append_column("source_row", pa.array(np.arange(before + 1, before + len(table) + 1)))


def _shift_rows(table: pa.Table, bad: list[BadRow], by: int) -> tuple[pa.Table, list[BadRow]]:
    if by:
        i = table.schema.get_field_index("source_row")
        table = table.set_column(i, "source_row", pc.add(table["source_row"], pa.scalar(by, pa.int64())))
        for b in bad:
            b.row += by
    return table, bad


def _text_blocks(path: Path, compression: Optional[str], cut: Callable[[bytes], int]):
    """(bytes, number of its first line, newlines in it) of whole records, about BLOCK_BYTES each;
    `cut` says where the last whole record of a buffer ends (0: none yet, read more). A plain file is
    read block by block from the byte after the last whole record (no copy of the block); a
    compressed one carries the partial record over."""
    if compression is None:
        with open(path, "rb", buffering=0) as f:
            pos, line, size = 0, 1, BLOCK_BYTES
            while True:
                f.seek(pos)
                chunk = f.read(size)
                if not chunk:
                    return
                k = len(chunk) if len(chunk) < size else cut(chunk)
                if k <= 0:
                    size *= 2  # a record longer than the block
                    continue
                newlines = chunk.count(b"\n", 0, k)
                yield (chunk if k == len(chunk) else memoryview(chunk)[:k]), line, newlines
                line, pos, size = line + newlines, pos + k, BLOCK_BYTES
    line = 1
    carry = b""
    with pa.input_stream(str(path), compression=compression) as f:
        while True:
            chunk = f.read(BLOCK_BYTES)
            data = carry + chunk if carry else chunk
            if not chunk:
                if data:
                    yield data, line, data.count(b"\n")
                return
            k = cut(data)
            if k <= 0:
                carry = data
                continue
            block, carry = data[:k], data[k:]
            newlines = block.count(b"\n")
            yield block, line, newlines
            line += newlines


def _after_last_newline(data: bytes) -> int:
    return data.rfind(b"\n") + 1


def _after_last_unquoted_newline(data: bytes) -> int:
    """A newline inside a quoted CSV cell is not a record's end: quotes before it must be even."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == 10)
    if not len(newlines):
        return 0
    quotes = np.cumsum(buf == 34)[newlines]
    outside = newlines[quotes % 2 == 0]
    return int(outside[-1]) + 1 if len(outside) else 0


def _csv_blocks(path: Path, compression: Optional[str], cfg: DatasetConfig):
    header = None
    records = 0
    for data, line, _ in _text_blocks(path, compression, _after_last_unquoted_newline):
        data = bytes(data)
        if header is None:
            end = _after_last_unquoted_newline(data[: data.find(b"\n") + 1]) or len(data)
            header = data[:end]
            table, bad = _read_csv(data, cfg, records)
        else:
            table, bad = _read_csv(header + data, cfg, records, line_offset=line - 2)
        records += len(table) + len(bad)
        yield table, bad


def _read_json_array(path: Path, data: bytes, cfg: DatasetConfig):
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


def _ipc_blocks(path: Path):
    with pa.memory_map(str(path), "r") as src:
        try:
            reader = pa.ipc.open_file(src)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            src.seek(0)
            batches = iter(pa.ipc.open_stream(src))  # datasets writes streams
        n = 0
        for batch in batches:
            yield _numbered(pa.Table.from_batches([batch]), n), []
            n += batch.num_rows


def _read_csv(data: bytes, cfg: DatasetConfig, records_before: int = 0,
              line_offset: int = 0) -> tuple[pa.Table, list[BadRow]]:
    """One block of CSV (header first): lines that are not UTF-8 and ragged rows become bad rows
    naming their data row (line − 1), so they can be quarantined; a cell of any size fits (the block
    is read whole). `line_offset`: lines of the file before this block's first data line, less one."""
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
        rows = list(range(records_before + 1 - line_offset, records_before + len(table) + 1 - line_offset))
    table = table.append_column("source_row", pa.array(rows, pa.int64()))
    return _shift_rows(table, sorted(bad, key=lambda b: b.row), line_offset)


def _read_jsonl(data, newlines: Optional[int] = None):
    """Fast path with Arrow's reader; on any complaint, a line-by-line pass that names the line.
    `data`: bytes or a memoryview of them."""
    import pyarrow.json as pjson
    try:
        str(data, "utf-8")  # Arrow's reader lets bad bytes through; the slow path names the line
        table = pjson.read_json(pa.BufferReader(pa.py_buffer(data)),
                                read_options=pjson.ReadOptions(block_size=16 << 20))
        n_lines = (bytes(data).count(b"\n") if newlines is None else newlines) + (len(data) > 0 and data[-1] != 10)
        if len(table) == n_lines:  # no blank line: row i is line i
            return table.append_column("source_row", pa.array(np.arange(1, n_lines + 1))), []
        lines = _nonblank_line_numbers(data)
        if len(table) == len(lines):
            return table.append_column("source_row", pa.array(lines)), []
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    data = bytes(data)
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
    nonblank = lengths > 0
    # Only a line that starts with whitespace can be blank: those few are looked at one by one.
    first = buf[np.minimum(starts, max(len(buf) - 1, 0))]
    for k in np.flatnonzero(nonblank & np.isin(first, (9, 13, 32))):
        nonblank[k] = bool(bytes(buf[starts[k]:ends[k]]).strip())
    return (np.flatnonzero(nonblank) + 1).astype(np.int64)


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
    return ds, {"name": cfg.source, "format": "hf", "split": cfg.split,
                "config": cfg.hf_config, "fingerprint": ds._fingerprint}


def _read_disk(cfg: DatasetConfig):
    import datasets
    ds = datasets.load_from_disk(cfg.source)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ProblemSetError(f"{cfg.source}: no split {cfg.split!r}; it has "
                                  f"{', '.join(ds)}. Set dataset.split.")
        ds = ds[cfg.split]
    return ds, {"path": str(Path(cfg.source).resolve()), "format": "disk",
                "split": cfg.split, "fingerprint": ds._fingerprint}


def _dataset_blocks(ds):
    arrow = ds.with_format("arrow")  # slices respect an indices mapping, unlike ds.data
    for start in range(0, len(ds), BATCH_ROWS):
        yield _numbered(arrow[start:start + BATCH_ROWS], start), []


# ---------------------------------------------------------------- field mapping and validation


def _check_fields(cfg: DatasetConfig, columns: list[str], name: str) -> None:
    """The mapped fields against the columns of the first rows read (a later block that lacks one
    has it missing in every row, which the row checks then report)."""
    f = cfg.fields
    for role, col in (("problem", f.problem), ("answer", f.answer), ("id", f.id)):
        if col is not None and col not in columns:
            raise ProblemSetError(
                f"{name}: no column '{col}' for dataset.fields.{role}; the columns are "
                f"{', '.join(columns)}. Set dataset.fields.{role}=<column>"
                + (" or null." if role != "problem" else "."))
    for c in f.metadata or []:
        if c not in columns:
            raise ProblemSetError(f"{name}: dataset.fields.metadata names '{c}', which is "
                                  f"not a column ({', '.join(columns)}).")


def _map_fields(table: pa.Table, cfg: DatasetConfig,
                first_columns: list[str]) -> tuple[pa.Table, list[BadRow], set]:
    f = cfg.fields
    columns = [c for c in table.column_names if c not in ("source_row", "source_file")]
    for col in (f.problem, f.answer, f.id, *(f.metadata or [])):
        if col is not None and col not in columns:
            table = table.append_column(col, pa.nulls(len(table)))
    rows = table["source_row"].combine_chunks()
    bad: dict[int, BadRow] = {}  # by table index: one complaint per row is enough

    def flag(mask, field, reason, hint):  # noqa: ANN001
        for i in np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)):
            bad.setdefault(int(i), BadRow(int(rows[i].as_py()), field, reason, hint))

    problem = _as_text(table[f.problem].combine_chunks(), f.problem, rows, bad, accept="problem")
    # Blank: nothing but whitespace, NULs, zero-width or other invisible characters.
    empty = pc.or_kleene(pc.is_null(problem),
                         pc.invert(pc.match_substring_regex(problem, r"[^\p{Cc}\p{Cf}\p{Z}]")))
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
    if "source_file" in table.column_names:
        out["source_file"] = table["source_file"].combine_chunks()
    meta_cols = [c for c in columns if c not in (f.problem, f.answer, f.id)] \
        if f.metadata is None else list(f.metadata)
    if keep_raw_answer and f.answer not in meta_cols:
        meta_cols.append(f.answer)
    json_fields = set()
    if meta_cols:
        arrays = [table[c].combine_chunks() for c in meta_cols]
        json_fields = {c for c, a in zip(meta_cols, arrays) if _is_mixed(a)}
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
        if "source_file" in table.column_names:
            for b in bad_rows:
                b.file = b.raw.pop("source_file", None)
    return mapped, bad_rows, json_fields


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
    def value(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"__type__", "__json__"}:  # a mixed-type column's cell
            return None if v["__json__"] is None else json.loads(v["__json__"])
        return v
    return {k: value(v) for k, v in row.items()}


def _with_ids(table: pa.Table, cfg: DatasetConfig) -> pa.Table:
    """Every row's id: the id field, or (stable across runs and machines) a hash of the problem text."""
    if "id" not in table.column_names:
        ids = pa.array([hashlib.sha256(p.encode("utf-8")).hexdigest()[:16]
                        for p in table["problem"].to_pylist()], pa.string())
        table = table.append_column("id", ids)
    return table.select(["id", "problem", "answer", "source_row"]
                        + [c for c in ("source_file", "metadata") if c in table.column_names])
