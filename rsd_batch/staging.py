"""Putting a streamed problem set together: duplicate ids across blocks, one schema, rows in order.

Pass one (`stage`) takes the blocks as they are read. Each row's id is reduced to a 64-bit hash and
looked up in `IdHashes` (8 bytes an id, never the id strings). A row whose hash was seen is held
back as a *suspect*; every other row is staged (in memory, or as an Arrow file per block under the
run's `.staging/`). At the end the suspects are confirmed against the real ids of the staged rows,
so a hash collision is never reported as a duplicate. Pass two (`Staged.batches`) yields the
final rows in source order, with the metadata of every block cast to one schema: the count is then
known, which is what planning equal shards needs.

When the source knows its row count up front (a clean JSON-lines file counted while it is hashed,
parquet, Arrow, a datasets folder), pass one hands its rows straight to pass two's shard writer
(`Cut`) and nothing is staged. The first thing that breaks that plan (a repeated id suspected, a
block whose metadata has another type, a count that turns out different) turns what was cut so far
into staged chunks, and pass one goes on as above: same rows, same bytes, one pass less.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import DatasetConfig, OnBadRow, OnDuplicateId
from .problems import BadRow, ProblemSetError, ProblemSource

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SPAN = 48  # bytes hashed from each end of a long id; equal hashes are confirmed anyway


def hash_ids(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash per string, vectorised over the Arrow buffers (a byte position per pass)."""
    ids = ids.cast(pa.large_string())
    n = len(ids)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset: ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None \
        else np.zeros(1, np.uint8)
    lens = np.diff(offsets)
    starts, ends = offsets[:-1], offsets[1:]
    last = max(len(data) - 1, 0)
    h = lens.astype(np.uint64) * _M1
    with np.errstate(over="ignore"):
        for k in range(min(int(lens.max()), _SPAN)):
            b = np.where(lens > k, data[np.minimum(starts + k, last)], 0).astype(np.uint64)
            h = (h ^ b) * _M2 + np.uint64(k)
        for k in range(1, min(int(lens.max()) - _SPAN, _SPAN) + 1):
            has = lens >= _SPAN + k
            b = np.where(has, data[np.clip(ends - k, 0, last)], 0).astype(np.uint64)
            h = np.where(has, (h ^ b) * _M1, h)
        h ^= h >> np.uint64(31)
        h *= _M2
        h ^= h >> np.uint64(29)
    return h


class IdHashes:
    """A set of 64-bit hashes in sorted runs that merge as they grow (log-many runs, 8 bytes a hash)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def seen(self, h: np.ndarray) -> np.ndarray:
        """Mark each hash already present (earlier, or earlier in `h`); add the others."""
        order = np.argsort(h, kind="stable")
        ordered = h[order]
        found = np.zeros(len(h), dtype=bool)  # in sorted order
        found[1:] = ordered[1:] == ordered[:-1]
        for run in self.runs:
            # sorted queries walk each run front to back: ~6x faster than in arrival order
            i = np.minimum(np.searchsorted(run, ordered), len(run) - 1)
            found |= run[i] == ordered
        hit = np.empty(len(h), dtype=bool)
        hit[order] = found
        new = ordered[~found]  # sorted, and unique: every repeat is a hit
        if len(new):
            self.runs.append(new)
            while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
                top = self.runs.pop()
                # two sorted runs: the stable sort merges them in one pass; they share no hash
                self.runs[-1] = np.sort(np.concatenate([self.runs[-1], top]), kind="stable")
        return hit


class Cut(Protocol):
    """Pass two's shard writer, fed in source order (tables with `_seq`)."""

    def feed(self, table: pa.Table) -> None: ...

    def finish(self) -> None: ...

    def abandon(self) -> tuple[list[tuple[Path, int, int]], list[pa.Table]]:
        """Stop: the files written so far as (path, first row, rows), and the rows not yet written."""


@dataclass
class _Chunk:
    first_seq: int  # sequence numbers [first_seq, end_seq) of the block's good rows, suspects included
    end_seq: int
    rows: int  # staged rows (suspects not counted)
    schema: pa.Schema
    json_fields: set
    table: Optional[pa.Table] = None
    path: Optional[Path] = None

    def read(self) -> pa.Table:
        if self.table is not None:
            return self.table
        with pa.memory_map(str(self.path), "r") as src:
            table = pa.ipc.open_file(src).read_all()
        if "_seq" not in table.column_names:  # a shard cut in pass one: its rows are consecutive
            table = table.append_column("_seq", pa.array(np.arange(self.first_seq, self.end_seq, dtype=np.int64)))
        return table


@dataclass
class Staged:
    source: dict
    num_rows: int
    bad_rows: list[BadRow]  # sorted by (file, row); quarantined with on_bad_row=skip
    cut: bool = False  # every row went to the shard writer in pass one: no pass two
    chunks: list[_Chunk] = field(default_factory=list)
    returned: dict[int, pa.Table] = field(default_factory=dict)  # chunk index -> suspects kept after all
    metadata_type: Optional[pa.DataType] = None
    json_fields: set = field(default_factory=set)

    def batches(self) -> Iterator[pa.Table]:
        """The final rows in source order, one table per block (empty ones skipped); once only: a
        staged file is deleted as soon as it is read."""
        for i, chunk in enumerate(self.chunks):
            table = chunk.read()
            if chunk.path is not None:
                chunk.path.unlink()  # read (mapped) already; its dirty pages need never reach the disk
            if i in self.returned:
                table = pa.concat_tables([table, self.returned[i]]).sort_by("_seq")
            table = table.drop_columns(["_seq"])
            if len(table) == 0:
                continue
            if self.metadata_type is not None:
                table = _conform_metadata(table, chunk, self.metadata_type, self.json_fields)
            yield table


def stage(src: ProblemSource, cfg: DatasetConfig, folder: Optional[Path] = None,
          cut: Optional[Callable[[int], Cut]] = None) -> Staged:
    """Pass one over `src`: validate, hold back repeated ids, stage the rest (under `folder` if given).
    `cut(rows)`: pass two's writer for that many rows, fed directly while the source's count holds."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    expected = src.rows() if cut is not None else None
    direct = cut(expected) if expected else None
    kind = None  # (metadata type, JSON-text fields) of the rows fed to `direct`
    hashes = IdHashes()
    chunks: list[_Chunk] = []
    suspects: list[tuple[int, pa.Table]] = []  # (chunk index, rows with _seq)
    bad: list[BadRow] = []
    seq = 0
    for block in src.blocks(cfg):
        if block.bad and cfg.on_bad_row == OnBadRow.error:
            _stop(src, block.bad[0], len(block.bad) - 1, "in the lines read so far")
        bad += block.bad
        table = block.table
        n = len(table)
        table = table.append_column("_seq", pa.array(np.arange(seq, seq + n, dtype=np.int64)))
        hit = hashes.seen(hash_ids(table["id"].combine_chunks()))
        if direct is not None:
            meta = table.schema.field("metadata").type if "metadata" in table.schema.names else None
            kind = kind or (meta, frozenset(block.json_fields))
            if not hit.any() and kind == (meta, frozenset(block.json_fields)):
                direct.feed(table)
                seq += n
                continue
            chunks += _cut_so_far(direct, kind)
            direct = None
        if hit.any():
            suspects.append((len(chunks), table.filter(pa.array(hit))))
            table = table.filter(pa.array(~hit))
        chunk = _Chunk(seq, seq + n, len(table), table.schema, block.json_fields)
        if folder is None:
            chunk.table = table
        else:
            chunk.path = folder / f"block-{len(chunks):06d}.arrow"
            with pa.OSFile(str(chunk.path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        chunks.append(chunk)
        seq += n
    if direct is not None and seq == expected and seq > 0:
        direct.finish()
        return Staged(source={**src.source, "unit": src.unit}, num_rows=seq, cut=True,
                      bad_rows=sorted(bad, key=lambda b: (b.file or "", b.row)))
    if direct is not None:
        chunks += _cut_so_far(direct, kind)  # the count was off (blank or bad lines): plan again
    staged = Staged(source={**src.source, "unit": src.unit}, num_rows=sum(c.rows for c in chunks),
                    bad_rows=[], chunks=chunks)
    dup_bad, dropped = _settle_suspects(staged, suspects, cfg, src.unit)
    if dup_bad and cfg.on_bad_row == OnBadRow.error:
        _stop(src, dup_bad[0], len(dup_bad) - 1 + len(bad), "")
    staged.bad_rows = sorted(bad + dup_bad + dropped, key=lambda b: (b.file or "", b.row))
    if staged.num_rows == 0:
        raise ProblemSetError(f"{src.name}: no usable rows (read {len(staged.bad_rows)} bad ones). "
                              "Check dataset.source and dataset.fields.")
    _unify_metadata(staged)
    return staged


def _cut_so_far(direct: Cut, kind: tuple) -> list[_Chunk]:
    """What `direct` took, as staged chunks: its written files, then the rows it still held."""
    files, held = direct.abandon()
    chunks = []
    for path, first, rows in files:
        with pa.memory_map(str(path), "r") as src:
            schema = pa.ipc.open_file(src).schema
        chunks.append(_Chunk(first, first + rows, rows, schema, set(kind[1]), path=path))
    for t in held:
        first = t["_seq"][0].as_py()
        chunks.append(_Chunk(first, first + len(t), len(t), t.schema, set(kind[1]), table=t))
    return chunks


def _stop(src: ProblemSource, first: BadRow, more: int, where: str) -> None:
    msg = first.describe(src.name, src.unit)
    if more > 0:
        msg += f" ({more} more bad rows after this one{' ' + where if where else ''}.)"
    raise ProblemSetError(msg)


def _settle_suspects(staged: Staged, suspects: list[tuple[int, pa.Table]], cfg: DatasetConfig,
                     unit: str) -> tuple[list[BadRow], list[BadRow]]:
    """Confirm each held-back row against the real ids before it: a true repeat is a bad row (or
    dropped, or renumbered), a hash collision goes back in its place."""
    if not suspects:
        return [], []
    # Held rows are addressed as (chunk index, row in that chunk's held table): blocks may differ in schema.
    held = {i: t for i, t in suspects}
    wanted = np.unique(np.concatenate([hash_ids(t["id"].combine_chunks()) for t in held.values()]))
    rows: dict[int, tuple[Optional[str], int]] = {}  # sequence number -> (file, row)
    events = []  # (sequence number, id, held address or None), in source order once sorted

    def note(t: pa.Table, addr):  # noqa: ANN001
        files = t["source_file"].to_pylist() if "source_file" in t.column_names else [None] * len(t)
        for k, (s, key, r, f) in enumerate(zip(t["_seq"].to_pylist(), t["id"].to_pylist(),
                                              t["source_row"].to_pylist(), files)):
            rows[s] = (f, int(r))
            events.append((s, key, None if addr is None else (addr, k)))

    for chunk in staged.chunks:
        t = chunk.read()
        mask = np.isin(hash_ids(t["id"].combine_chunks()), wanted)
        if mask.any():
            note(t.filter(pa.array(mask)).select(
                ["_seq", "id", "source_row"] + (["source_file"] if "source_file" in t.column_names else [])), None)
    for i, t in held.items():
        note(t, i)
    first: dict[str, int] = {}  # id -> sequence number of its first row
    back: list[tuple[int, int]] = []  # held rows that are not repeats after all
    repeats: list[tuple[tuple[int, int], str, int]] = []  # (address, id, sequence number)
    new_ids: dict[tuple[int, int], str] = {}
    count: dict[str, int] = {}
    for s, key, addr in sorted(events, key=lambda e: e[0]):
        if key not in first:
            first[key] = s
            if addr is not None:
                back.append(addr)
        elif addr is not None:
            repeats.append((addr, key, s))
            count[key] = count.get(key, 1) + 1
            new_ids[addr] = f"{key}#{count[key]}"
    how = cfg.on_duplicate_id
    if how == OnDuplicateId.number:
        back += [addr for addr, _, _ in repeats]
        for i in {addr[0] for addr in new_ids}:
            ids = held[i]["id"].to_pylist()
            for (j, k), new in new_ids.items():
                if j == i:
                    ids[k] = new
            held[i] = held[i].set_column(held[i].schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
        repeats = []
    dup_rows = []
    for (i, k), key, s in repeats:
        f, row = rows[s]
        ff, frow = rows[first[key]]
        seen_at = f"{unit} {frow}" if ff == f else f"{ff}, {unit} {frow}"
        raw = held[i].slice(k, 1).drop_columns(["_seq"]).to_pylist()[0]
        raw.pop("source_file", None)
        dup_rows.append(BadRow(row, cfg.fields.id or "problem",
                               f"duplicate id '{key}' (first seen at {seen_at})"
                               + ("" if cfg.fields.id else ": the same problem text appears twice"),
                               "Set dataset.on_duplicate_id=keep_first to keep the first and quarantine the "
                               "rest, or =number to suffix later ones with #2, #3, ...", raw=raw, file=f))
    for i in {i for i, _ in back}:
        ks = sorted(k for j, k in back if j == i)
        staged.returned[i] = held[i].take(pa.array(ks, pa.int64()))
        staged.num_rows += len(ks)
    if how == OnDuplicateId.keep_first:
        for b in dup_rows:
            b.hint = "dropped by dataset.on_duplicate_id=keep_first"
        return [], dup_rows
    return dup_rows, []


# ---------------------------------------------------------------- one metadata schema for every block


def _unify_metadata(staged: Staged) -> None:
    """The metadata struct every block is cast to: types promoted across blocks (null -> any,
    int -> float, struct fields united); a field that still disagrees, or that some block had to
    keep as JSON text (mixed types), is JSON text in every block."""
    types = [c.schema.field("metadata").type for c in staged.chunks if "metadata" in c.schema.names]
    if not types:
        return
    names: dict[str, list[pa.DataType]] = {}
    for t in types:
        for f in t:
            names.setdefault(f.name, []).append(f.type)
    json_fields = set().union(*(c.json_fields for c in staged.chunks))
    fields = []
    for name, ts in names.items():
        if name not in json_fields:
            try:
                unified = pa.unify_schemas([pa.schema([(name, t)]) for t in ts],
                                           promote_options="permissive").field(name).type
                if not (pa.types.is_string(unified) and any(not pa.types.is_string(t) and not pa.types.is_null(t)
                                                            for t in ts)):
                    fields.append(pa.field(name, unified))
                    continue
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        json_fields.add(name)
        fields.append(pa.field(name, pa.string()))
    staged.metadata_type = pa.struct(fields)
    staged.json_fields = json_fields


def _conform_metadata(table: pa.Table, chunk: _Chunk, want: pa.StructType, json_fields: set) -> pa.Table:
    i = table.schema.get_field_index("metadata")
    have = table["metadata"].combine_chunks() if i >= 0 else None
    if have is not None and have.type == want and not (json_fields - chunk.json_fields) & {f.name for f in want}:
        return table  # a field of strings here may still be JSON text elsewhere: then it is encoded below
    children = []
    for f in want:
        idx = have.type.get_field_index(f.name) if have is not None else -1
        if idx < 0:
            children.append(pa.nulls(len(table), f.type))
            continue
        child = have.field(idx)
        if f.name in json_fields and f.name not in chunk.json_fields:
            child = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                              for v in child.to_pylist()], pa.string())
        children.append(_conform(child, f.type))
    meta = pa.StructArray.from_arrays(children, fields=list(want))
    if i >= 0:
        return table.set_column(i, "metadata", meta)
    return table.append_column("metadata", meta)


def _conform(arr: pa.Array, want: pa.DataType) -> pa.Array:
    if arr.type == want:
        return arr
    if pa.types.is_struct(want) and pa.types.is_struct(arr.type):
        kids = []
        for f in want:
            j = arr.type.get_field_index(f.name)
            kids.append(pa.nulls(len(arr), f.type) if j < 0 else _conform(arr.field(j), f.type))
        return pa.StructArray.from_arrays(kids, fields=list(want), mask=pc.invert(arr.is_valid()))
    return arr.cast(want)
