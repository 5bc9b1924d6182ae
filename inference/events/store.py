"""The event history: one SQLite database and the event's files under ``--data-dir``.

``events.db`` holds one row per event; ``clips/ID.mp4`` (``clips/ID.part.mp4`` while it is being
written), ``snapshots/ID.jpg`` (with the overlay) and ``snapshots/ID-clean.jpg`` (without) hold its
pictures. An event open when the process died (its row says ``open``) is closed at the next
:meth:`EventStore.open`: its end is the last time the recorder touched it (every second while it
records) and its clip is finished from what was written (:func:`inference.events.clip.salvage`).

Retention (:meth:`EventStore.prune`) deletes closed events older than ``--retain-days`` and then
the oldest ones until the files fit in ``--retain-mb``; an open event is never deleted.

One connection for the process, behind a lock: the recorder writes an event a second at most,
the API reads, and SQLite's own locking is not needed between threads of one process.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    start REAL NOT NULL,
    "end" REAL,
    touched REAL NOT NULL,
    best_prob REAL NOT NULL,
    box TEXT,
    best_at REAL,
    model TEXT NOT NULL,
    source TEXT,
    state TEXT NOT NULL,
    end_reason TEXT,
    clip_kind TEXT,
    bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_start ON events (start);
CREATE INDEX IF NOT EXISTS events_label ON events (label, start);
"""
OPEN, CLOSED, INTERRUPTED = "open", "closed", "interrupted"
Box = Optional[Tuple[float, float, float, float]]


class StoreError(RuntimeError):
    pass


def default_data_dir(env: Optional[Mapping[str, str]] = None) -> Path:
    """$XDG_DATA_HOME/deeplens-dashboard, else ~/.local/share/deeplens-dashboard (the XDG base
    directory spec's place for data a user keeps; the device's service sets its own)."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "deeplens-dashboard"


@dataclass
class EventRecord:
    id: int
    label: str
    start: float
    end: Optional[float]
    touched: float
    best_prob: float
    box: Box
    best_at: Optional[float]
    model: str
    source: Optional[Dict[str, Any]]
    state: str
    end_reason: Optional[str]
    clip_kind: Optional[str]
    bytes: int
    files: Dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def in_progress(self) -> bool:
        return self.state == OPEN

    def to_json(self) -> Dict[str, Any]:
        end = self.end if self.end is not None else None
        last = end if end is not None else self.touched
        out: Dict[str, Any] = {
            "id": self.id, "label": self.label, "start_time": round(self.start, 3),
            "end_time": round(end, 3) if end is not None else None,
            "duration": round(max(0.0, last - self.start), 3),
            "in_progress": self.in_progress, "state": self.state, "end_reason": self.end_reason,
            "best_prob": round(self.best_prob, 6), "best_time": self.best_at,
            "box": (dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 1) for v in self.box)))
                    if self.box else None),
            "model": self.model, "source": self.source, "clip_kind": self.clip_kind,
            "bytes": self.bytes,
            "has_clip": "clip" in self.files or "clip_part" in self.files,
            "has_snapshot": "snapshot" in self.files,
        }
        return out


class EventStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir).expanduser()
        self.db_path = self.dir / "events.db"
        self.clips = self.dir / "clips"
        self.snapshots = self.dir / "snapshots"
        self._lock = threading.RLock()
        self._db: Optional[sqlite3.Connection] = None
        self._lock_fd: Optional[int] = None

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> List[int]:
        """Create or open the store; close the events a dead process left open (their ids).

        Every process with the store open holds a shared ``flock`` on ``events.lock`` (the
        kernel drops it however the process ends). Open events are closed as interrupted only
        by a process that could take it exclusively, i.e. when no other live dashboard uses
        this folder: a second dashboard on the same ``--data-dir`` never closes the first's
        event in progress."""
        with self._lock:
            if self._db is not None:
                return []
            try:
                for folder in (self.dir, self.clips, self.snapshots):
                    folder.mkdir(parents=True, exist_ok=True)
                lock_fd = os.open(str(self.dir / "events.lock"),
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(f"cannot open the event store in {self.dir}: {exc}") from None
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except OSError:  # another dashboard has this folder open
                alone = False
            try:
                db = sqlite3.connect(str(self.db_path), check_same_thread=False,
                                     isolation_level=None, timeout=5.0)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                os.close(lock_fd)
                raise StoreError(f"cannot open the event store in {self.dir}: {exc}") from None
            self._db, self._lock_fd = db, lock_fd
            closed = self._close_interrupted() if alone else []
            # Shared from now on: others may open the store too, and wait here only while one
            # of them closes what a dead process left.
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            return closed

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("the event store is not open")
        return self._db

    def _close_interrupted(self) -> List[int]:
        from inference.events.clip import salvage

        rows = self._conn().execute("SELECT id, touched FROM events WHERE state = ?",
                                    (OPEN,)).fetchall()
        closed = []
        for row in rows:
            event_id = int(row["id"])
            salvage(self.clip_part(event_id), self.clip_path(event_id))
            self._conn().execute(
                'UPDATE events SET state = ?, "end" = touched, end_reason = ?, bytes = ? '
                "WHERE id = ?", (INTERRUPTED, "interrupted", self._bytes_of(event_id), event_id))
            closed.append(event_id)
            log.warning("event %d was open when the process stopped; closed at its last update",
                        event_id)
        return closed

    # -- paths -----------------------------------------------------------------------------------
    def clip_path(self, event_id: int) -> Path:
        return self.clips / f"{event_id}.mp4"

    def clip_part(self, event_id: int) -> Path:
        return self.clips / f"{event_id}.part.mp4"

    def snapshot_path(self, event_id: int, clean: bool = False) -> Path:
        return self.snapshots / (f"{event_id}-clean.jpg" if clean else f"{event_id}.jpg")

    def _files(self, event_id: int) -> Dict[str, Path]:
        candidates = {"clip": self.clip_path(event_id), "clip_part": self.clip_part(event_id),
                      "snapshot": self.snapshot_path(event_id),
                      "snapshot_clean": self.snapshot_path(event_id, clean=True)}
        return {k: p for k, p in candidates.items() if p.exists()}

    def _bytes_of(self, event_id: int) -> int:
        total = 0
        for path in self._files(event_id).values():
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    # -- writes ----------------------------------------------------------------------------------
    def create(self, label: str, start: float, prob: float, box: Box, model: str,
               source: Optional[Dict[str, Any]], clip_kind: Optional[str]) -> int:
        with self._lock:
            try:
                cur = self._conn().execute(
                    'INSERT INTO events (label, start, touched, best_prob, box, best_at, model, '
                    "source, state, clip_kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (label, start, time.time(), prob, json.dumps(box) if box else None, start,
                     model, json.dumps(source) if source else None, OPEN, clip_kind))
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from None
            return int(cur.lastrowid or 0)

    def touch(self, event_id: int, best_prob: Optional[float] = None, box: Box = None,
              best_at: Optional[float] = None) -> None:
        with self._lock:
            try:
                if best_prob is None:
                    self._conn().execute("UPDATE events SET touched = ? WHERE id = ?",
                                         (time.time(), event_id))
                else:
                    self._conn().execute(
                        "UPDATE events SET touched = ?, best_prob = ?, box = ?, best_at = ? "
                        "WHERE id = ?",
                        (time.time(), best_prob, json.dumps(box) if box else None, best_at,
                         event_id))
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from None

    def finish(self, event_id: int, end: float, reason: str) -> None:
        with self._lock:
            try:
                self._conn().execute(
                    'UPDATE events SET state = ?, "end" = ?, touched = ?, end_reason = ?, '
                    "bytes = ? WHERE id = ?",
                    (CLOSED, end, time.time(), reason, self._bytes_of(event_id), event_id))
            except sqlite3.Error as exc:
                raise StoreError(str(exc)) from None

    def delete(self, event_id: int) -> Optional[bool]:
        """True when deleted, False for an event in progress (kept), None when unknown."""
        with self._lock:
            record = self.get(event_id)
            if record is None:
                return None
            if record.in_progress:
                return False
            self._delete(event_id)
            return True

    def _delete(self, event_id: int) -> None:
        for path in self._files(event_id).values():
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot delete %s: %s", path, exc)
        self._conn().execute("DELETE FROM events WHERE id = ?", (event_id,))

    # -- reads -----------------------------------------------------------------------------------
    def _record(self, row: sqlite3.Row) -> EventRecord:
        box = json.loads(row["box"]) if row["box"] else None
        event_id = int(row["id"])
        return EventRecord(
            id=event_id, label=row["label"], start=row["start"], end=row["end"],
            touched=row["touched"], best_prob=row["best_prob"],
            box=tuple(box) if box else None,
            best_at=row["best_at"], model=row["model"],
            source=json.loads(row["source"]) if row["source"] else None, state=row["state"],
            end_reason=row["end_reason"], clip_kind=row["clip_kind"], bytes=row["bytes"],
            files=self._files(event_id))

    def get(self, event_id: int) -> Optional[EventRecord]:
        with self._lock:
            row = self._conn().execute("SELECT * FROM events WHERE id = ?", (event_id,)).fetchone()
            return self._record(row) if row else None

    def list(self, label: Optional[str] = None, since: Optional[float] = None,
             until: Optional[float] = None, limit: int = 50) -> List[EventRecord]:
        """Newest first; ``since``/``until`` bound the start time (Unix seconds)."""
        where, args = [], []  # type: Tuple[List[str], List[Any]]
        if label:
            where.append("label = ?")
            args.append(label)
        if since is not None:
            where.append("start >= ?")
            args.append(since)
        if until is not None:
            where.append("start <= ?")
            args.append(until)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY start DESC, id DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            return [self._record(r) for r in self._conn().execute(sql, args).fetchall()]

    def labels(self) -> List[str]:
        with self._lock:
            rows = self._conn().execute("SELECT DISTINCT label FROM events ORDER BY label")
            return [r["label"] for r in rows.fetchall()]

    def count(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def usage_bytes(self) -> int:
        """Bytes of every event's files (the database itself is small and not counted)."""
        total = 0
        for folder in (self.clips, self.snapshots):
            for entry in _scandir(folder):
                try:
                    total += entry.stat().st_size
                except OSError:
                    pass
        return total

    # -- retention -------------------------------------------------------------------------------
    def prune(self, retain_days: float, retain_mb: float, now: Optional[float] = None) -> List[int]:
        """Delete closed events older than ``retain_days`` (0: no age limit), then the oldest
        until the files fit in ``retain_mb`` (0: no size limit). Returns the ids deleted."""
        now = time.time() if now is None else now
        deleted: List[int] = []
        with self._lock:
            if retain_days > 0:
                rows = self._conn().execute(
                    "SELECT id FROM events WHERE state != ? AND start < ? ORDER BY start",
                    (OPEN, now - retain_days * 86400)).fetchall()
                for row in rows:
                    self._delete(int(row["id"]))
                    deleted.append(int(row["id"]))
            if retain_mb > 0:
                budget = retain_mb * 1024 * 1024
                used = self.usage_bytes()
                if used > budget:
                    rows = self._conn().execute(
                        "SELECT id FROM events WHERE state != ? ORDER BY start, id",
                        (OPEN,)).fetchall()
                    for row in rows:
                        if used <= budget:
                            break
                        event_id = int(row["id"])
                        used -= self._bytes_of(event_id)
                        self._delete(event_id)
                        deleted.append(event_id)
        if deleted:
            log.info("retention deleted %d event(s), oldest first", len(deleted))
        return deleted


def _scandir(folder: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    yield entry
    except OSError:
        return
