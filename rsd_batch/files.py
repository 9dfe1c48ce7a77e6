"""Atomic writes and fingerprints: every file a run depends on appears whole or not at all."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path, durable: bool = True, needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it, rename it over `path` and fsync the folder.
    `durable=False` keeps the temp-then-rename but leaves the flush to the kernel: for files whose
    sha256 is checked on every read and which can be made again (shards). A full disk is `DiskFull`,
    naming the folder and, given `needed`, the bytes the file needs."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, needed) from None
        raise
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are shared like any other file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, needed) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


class DiskFull(UserError, OSError):
    """No space (or quota) left where a run-folder file is written. Nothing half-written is left: the
    last committed state stands, and the same command resumes once there is room."""

    def __init__(self, path: Path, needed: int | None = None) -> None:
        folder = Path(path).parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
        need = f"; this file needs about {_size(needed)}" if needed else ""
        super().__init__(f"{folder}: the disk is full ({_size(free)} free) while writing {Path(path).name}{need}. "
                         "Nothing committed was lost. Free some space there (or move the run folder), then run "
                         "the same command again: it resumes from the last committed batch.")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


class CorruptFile(UserError, ValueError):
    """A file of a run folder that cannot be what rsd-batch wrote there: unreadable, torn, edited."""

    def __init__(self, path: Path, why: str, hint: str = "") -> None:
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: {why}." + (f" {hint}" if hint else
                                               " It was changed or damaged outside rsd-batch; "
                                               "`rsd-batch doctor run.dir=<run>` says how to repair it."))


def read_json(path: Path, keys: tuple[str, ...] = ()) -> Any:
    """A JSON file this project wrote, with `keys` present; CorruptFile if it is not."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(path, f"not valid JSON ({e})") from None
    if keys and (not isinstance(obj, dict) or any(k not in obj for k in keys)):
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        raise CorruptFile(path, f"lacks {', '.join(missing)}")
    return obj


def write_arrow(path: Path, table: pa.Table, durable: bool = True) -> str:
    """An Arrow IPC file (random access, memory-mappable), written atomically; returns its sha256
    (hashed from memory, so the file is not read back)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    buf = sink.getvalue()
    with atomic_path(path, durable, needed=buf.size) as tmp, open(tmp, "wb") as f:
        f.write(buf)
    return hashlib.sha256(buf).hexdigest()


def read_arrow(path: Path, columns: list[str] | None = None, rows: int | None = None,
               sha256: str | None = None) -> pa.Table:
    """An Arrow IPC file, checked: a readable footer, and `rows` / `sha256` when the caller recorded them."""
    if sha256 is not None and sha256_file(path) != sha256:
        raise CorruptFile(path, "its sha256 does not match the one recorded when it was written")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptFile(path, f"not a readable Arrow file ({e})") from None
    if rows is not None and table.num_rows != rows:
        raise CorruptFile(path, f"{table.num_rows} rows where {rows} were written")
    return table.select(columns) if columns else table


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_cache_path() -> Path:
    root = os.environ.get("RSD_BATCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "rsd_batch"
    return Path(root) / "file-sha256.json"


def file_sha256_cached(path: Path) -> str:
    """sha256 of a (large, rarely changing) file, remembered by (absolute path, size, mtime, ctime,
    inode): a 15 GB checkpoint is hashed once, not on every resume; any rewrite changes the stamp."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}"
    cache_file = _hash_cache_path()
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    except (OSError, ValueError):
        cache = {}
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    hit = cache.get(key)
    if hit and all(hit.get(k) == v for k, v in stamp.items()):
        return hit["sha256"]
    digest = sha256_file(path)
    cache[key] = {**stamp, "sha256": digest}
    try:
        write_json(cache_file, cache)
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
