"""Where ``fastdit serve`` keeps its jobs and files: a small :class:`JobStore` interface with SQLite
behind it (:class:`SQLiteJobStore`), and :class:`ContentFiles`, files named by the SHA-256 of their
bytes.

A job's id never reaches the filesystem: ids are checked against :data:`JOB_ID` before any lookup,
and a file's name is its digest (checked against :data:`DIGEST`), read back from the store.
"""

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

JOB_ID = re.compile(r"video_[0-9a-f]{32}\Z")
DIGEST = re.compile(r"[0-9a-f]{64}\Z")
STATUSES = ("queued", "in_progress", "completed", "failed")  # the OpenAI video object's


@dataclass
class JobRecord:
    """One accepted request, as stored: ``spec`` is its validated parameters (JSON-able), ``video``
    the digest of its MP4 once completed, ``error`` ``{"code", "message"}`` once failed."""

    id: str
    created_at: int
    spec: dict
    status: str = "queued"
    progress: int = 0  # 0 - 100
    completed_at: int | None = None
    error: dict | None = None
    video: str | None = None


class JobStore(ABC):
    """What a server needs of its job store; every method is safe to call from any thread."""

    @abstractmethod
    def add(self, record: JobRecord) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def update(self, job_id: str, **fields) -> bool:
        """Set ``fields`` of a job; False when it is gone (deleted)."""

    @abstractmethod
    def set_progress(self, progress: dict[str, int]) -> None:
        """Many jobs' progress at once (one transaction per sampler step); a queued job among them
        becomes in progress."""

    @abstractmethod
    def delete(self, job_id: str) -> JobRecord | None:
        """Remove a job; returns it (None when unknown)."""

    @abstractmethod
    def page(self, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` jobs after the job ``after`` in creation order (``asc``) or its reverse
        (``desc``), and whether more follow. A ``KeyError`` when ``after`` is unknown."""

    @abstractmethod
    def unfinished(self) -> list[JobRecord]:
        """Queued and in-progress jobs, oldest first (what a restarted server runs again)."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Jobs per status."""

    @abstractmethod
    def references(self, digest: str) -> int:
        """How many jobs name the video ``digest``."""


class SQLiteJobStore(JobStore):
    """Jobs in one SQLite file (write-ahead log, one connection behind a lock)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                "created_at INTEGER NOT NULL, status TEXT NOT NULL, progress INTEGER NOT NULL, completed_at INTEGER, "
                "error TEXT, spec TEXT NOT NULL, video TEXT)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status)")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_video ON jobs (video)")

    _COLUMNS = "id, created_at, status, progress, completed_at, error, spec, video"

    @staticmethod
    def _record(row) -> JobRecord:
        job_id, created, status, progress, completed, error, spec, video = row
        return JobRecord(job_id, created, json.loads(spec), status, progress, completed,
                         json.loads(error) if error else None, video)  # fmt: skip

    def _query(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add(self, record: JobRecord) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, record.created_at, record.status, record.progress, record.completed_at,
                 json.dumps(record.error) if record.error else None, json.dumps(record.spec), record.video),
            )  # fmt: skip

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._query(f"SELECT {self._COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return self._record(rows[0]) if rows else None

    _UPDATABLE = ("status", "progress", "completed_at", "error", "video")

    def update(self, job_id: str, **fields) -> bool:
        unknown = set(fields) - set(self._UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; updatable: {self._UPDATABLE}")
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        names = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            cursor = self._db.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))
            return cursor.rowcount == 1

    def set_progress(self, progress: dict[str, int]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE jobs SET progress = ?, status = 'in_progress' "
                "WHERE id = ? AND status IN ('queued', 'in_progress')",
                [(p, i) for i, p in progress.items()],
            )
            self._db.execute("COMMIT")

    def delete(self, job_id: str) -> JobRecord | None:
        with self._lock:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchall()
            if not rows:
                return None
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return self._record(rows[0])

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        where, args = "", []
        if after is not None:
            seq = self._query("SELECT seq FROM jobs WHERE id = ?", (after,))
            if not seq:
                raise KeyError(after)
            where, args = f"WHERE seq {'>' if order == 'asc' else '<'} ?", [seq[0][0]]
        rows = self._query(f"SELECT {self._COLUMNS} FROM jobs {where} ORDER BY seq {order.upper()} LIMIT ?",
                           (*args, limit + 1))  # fmt: skip
        return [self._record(r) for r in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[JobRecord]:
        rows = self._query(f"SELECT {self._COLUMNS} FROM jobs WHERE status IN ('queued', 'in_progress') ORDER BY seq")
        return [self._record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(dict(self._query("SELECT status, COUNT(*) FROM jobs GROUP BY status")))
        return counts

    def references(self, digest: str) -> int:
        return self._query("SELECT COUNT(*) FROM jobs WHERE video = ?", (digest,))[0][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ContentFiles:
    """Files under ``root`` named ``<sha256 of the bytes><suffix>``: the same bytes are stored once,
    and no caller-chosen name becomes a path."""

    def __init__(self, root: str, suffix: str):
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", suffix):
            raise ValueError(f"suffix must be like '.mp4', got {suffix!r}")
        self.root, self.suffix = root, suffix
        os.makedirs(root, exist_ok=True)

    def path(self, digest: str) -> str:
        if not isinstance(digest, str) or not DIGEST.match(digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return os.path.join(self.root, digest + self.suffix)

    def temporary(self) -> str:
        """A fresh path in ``root`` to write a file to before :meth:`adopt` names it."""
        handle, path = tempfile.mkstemp(dir=self.root, prefix=".partial-", suffix=self.suffix)
        os.close(handle)
        return path

    def adopt(self, temporary: str) -> str:
        """Move a finished file written at :meth:`temporary`'s path to its content name; its digest."""
        digest = hashlib.sha256()
        with open(temporary, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        name = digest.hexdigest()
        os.replace(temporary, self.path(name))
        return name

    def put(self, data: bytes) -> str:
        path = self.temporary()
        with open(path, "wb") as f:
            f.write(data)
        return self.adopt(path)

    def remove(self, digest: str) -> None:
        try:
            os.remove(self.path(digest))
        except FileNotFoundError:
            pass

    def sweep_partial(self) -> None:
        """Remove files a killed server left half-written."""
        for name in os.listdir(self.root):
            if name.startswith(".partial-"):
                os.remove(os.path.join(self.root, name))
