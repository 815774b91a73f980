"""The labels of a labeling loop: one SQLite database (WAL), append-only, shared by processes.

Every label is a row: model, image id, label (a class name, or findings joined by ``|``),
annotator, the model version that suggested the image, time. A correction is a new row; an
undo is a row with an empty label (the image is unlabeled again). The current label of an
image is its latest row. Nothing is updated or deleted in ``labels``.

Leases hand images out: :meth:`LabelStore.lease` takes the next images of a ranking that are
neither labeled nor leased to someone else (unexpired), and leases them to the asker, in one
``BEGIN IMMEDIATE`` transaction, so two annotators (or two server processes) asking at once
never get the same image within a lease.

Jobs: one retraining job per model at a time (:meth:`LabelStore.claim_job`, in one
``BEGIN IMMEDIATE`` transaction, so two server processes cannot both start one). Audit: who
trained, promoted, labeled or skipped what, and when (:meth:`LabelStore.audit`).

Durability: WAL with ``synchronous=FULL``: :meth:`LabelStore.add` returns after the commit is
on disk, so a label acknowledged is a label kept, even if the process is killed right after.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds a queued image stays reserved for the annotator it was handed to.
LEASE_S = 600.0
#: Job states that hold a model's one training slot.
ACTIVE = ("SUBMITTING", "PENDING", "RUNNING")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    image_id TEXT NOT NULL,
    label TEXT NOT NULL,
    annotator TEXT NOT NULL,
    version TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_image ON labels (model, image_id, seq);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '',
    version TEXT,
    labels INTEGER NOT NULL DEFAULT 0,
    result TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS skips (
    model TEXT NOT NULL,
    image_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (model, image_id, annotator)
);
CREATE TABLE IF NOT EXISTS leases (
    model TEXT NOT NULL,
    image_id TEXT NOT NULL,
    annotator TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (model, image_id)
);
"""
_CURRENT = """
SELECT l.seq, l.model, l.image_id, l.label, l.annotator, l.version, l.created
FROM labels l JOIN (
    SELECT image_id, MAX(seq) AS last FROM labels WHERE model = ? GROUP BY image_id
) x ON l.seq = x.last
"""


class LabelStoreError(ValueError):
    """A label store that cannot be opened or a request it cannot take; names the problem."""


@dataclass(frozen=True)
class Label:
    """One row of ``labels``."""

    seq: int
    model: str
    image_id: str
    label: str
    annotator: str
    version: str | None
    created: float


class LabelStore:
    """One SQLite file of labels and leases (see the module docstring).

    Args:
        path: The database file; its folder is created. Several processes may open it.
        timeout_s: How long a writer waits for another's transaction.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise LabelStoreError(f"cannot open the label store {self.path}: {err}") from err
        self._lock = threading.Lock()  # one connection, shared by the server's threads

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back
        when it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(
        self,
        model: str,
        image_id: str,
        label: str,
        annotator: str,
        version: str | None = None,
        now: float | None = None,
    ) -> Label:
        """Append one label (``""``: undo, the image unlabeled again); returns it once it is
        committed to disk. The image's lease, if any, ends."""
        created = time.time() if now is None else now
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO labels (model, image_id, label, annotator, version, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (model, image_id, label, annotator, version, created),
            )
            db.execute("DELETE FROM leases WHERE model = ? AND image_id = ?", (model, image_id))
            seq = int(cur.lastrowid or 0)
        return Label(seq, model, image_id, label, annotator, version, created)

    def current(self, model: str) -> dict[str, Label]:
        """Each labeled image's current label (its latest row; undone images left out)."""
        with self._lock:
            rows = self._db.execute(_CURRENT, (model,)).fetchall()
        return {r[2]: Label(*r) for r in rows if r[3] != ""}

    def history(self, model: str) -> list[Label]:
        """Every row of ``model``, oldest first: the audit trail."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, model, image_id, label, annotator, version, created FROM labels "
                "WHERE model = ? ORDER BY seq",
                (model,),
            ).fetchall()
        return [Label(*r) for r in rows]

    def lease(
        self,
        model: str,
        ranked: Sequence[str],
        k: int,
        annotator: str,
        lease_s: float = LEASE_S,
        now: float | None = None,
    ) -> list[str]:
        """The next ``k`` images of ``ranked`` for ``annotator``: not labeled, not leased to
        another annotator (an unexpired lease), leased to this one for ``lease_s`` seconds.
        The annotator's own unexpired leases come back first (a reload loses nothing).

        Raises:
            LabelStoreError: ``k`` below 1 or a lease that is not positive.
        """
        if k < 1 or lease_s <= 0:
            raise LabelStoreError(f"lease needs k >= 1 and a positive lease, got {k}, {lease_s}")
        t = time.time() if now is None else now
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE model = ? AND expires <= ?", (model, t))
            labeled = {r[2] for r in db.execute(_CURRENT, (model,)).fetchall() if r[3] != ""}
            held = dict(
                db.execute(
                    "SELECT image_id, annotator FROM leases WHERE model = ?", (model,)
                ).fetchall()
            )
            skipped = {
                r[0]
                for r in db.execute(
                    "SELECT image_id FROM skips WHERE model = ? AND annotator = ? AND until > ?",
                    (model, annotator, t),
                ).fetchall()
            }
            mine = [i for i in ranked if held.get(i) == annotator and i not in labeled]
            free = [i for i in ranked if i not in held and i not in labeled and i not in skipped]
            picked = (mine + free)[:k]
            db.executemany(
                "INSERT OR REPLACE INTO leases (model, image_id, annotator, expires) "
                "VALUES (?, ?, ?, ?)",
                [(model, i, annotator, t + lease_s) for i in picked],
            )
        return picked

    def leases(self, model: str, now: float | None = None) -> dict[str, str]:
        """The unexpired leases of ``model``: ``{image id: annotator}``."""
        t = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT image_id, annotator FROM leases WHERE model = ? AND expires > ?",
                (model, t),
            ).fetchall()
        return dict(rows)

    def release(
        self,
        model: str,
        image_id: str,
        annotator: str,
        skip_s: float = 0.0,
        now: float | None = None,
    ) -> None:
        """End ``annotator``'s lease of one image; with ``skip_s`` (a skip), the image is not
        handed to this annotator again for that long (others may get it at once)."""
        t = time.time() if now is None else now
        with self._write() as db:
            db.execute(
                "DELETE FROM leases WHERE model = ? AND image_id = ? AND annotator = ?",
                (model, image_id, annotator),
            )
            if skip_s > 0:
                db.execute(
                    "INSERT OR REPLACE INTO skips (model, image_id, annotator, until) "
                    "VALUES (?, ?, ?, ?)",
                    (model, image_id, annotator, t + skip_s),
                )

    def counts(self, model: str) -> dict[str, int]:
        """Current labels per label value."""
        out: dict[str, int] = {}
        for lab in self.current(model).values():
            out[lab.label] = out.get(lab.label, 0) + 1
        return out

    # ------------------------------------------------------------------ jobs and audit

    def claim_job(
        self, model: str, job_id: str, who: str, labels: int, now: float | None = None
    ) -> str | None:
        """Record a new job of ``model`` as ``SUBMITTING``, unless one is active.

        Returns:
            None when claimed; else the id of the active job (nothing recorded).
        """
        t = time.time() if now is None else now
        with self._write() as db:
            marks = ",".join("?" * len(ACTIVE))
            row = db.execute(
                f"SELECT id FROM jobs WHERE model = ? AND state IN ({marks}) "
                "ORDER BY created LIMIT 1",
                (model, *ACTIVE),
            ).fetchone()
            if row:
                return str(row[0])
            db.execute(
                "INSERT INTO jobs (id, model, submitted_by, created, state, labels, updated) "
                "VALUES (?, ?, ?, ?, 'SUBMITTING', ?, ?)",
                (job_id, model, who, t, labels, t),
            )
        return None

    def update_job(self, job_id: str, **fields: object) -> None:
        """Set ``state``, ``message``, ``progress``, ``version`` or ``result`` of a job."""
        bad = set(fields) - {"state", "message", "progress", "version", "result"}
        if bad:
            raise LabelStoreError(f"jobs have no field(s) {sorted(bad)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE jobs SET {cols}, updated = ? WHERE id = ?",
                (*fields.values(), time.time(), job_id),
            )

    def job(self, job_id: str) -> dict[str, object] | None:
        """One job's row as a dict, or None."""
        rows = self._jobs("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def jobs(self, model: str, active: bool = False) -> list[dict[str, object]]:
        """The jobs of ``model``, newest first (``active``: only those not finished)."""
        if active:
            marks = ",".join("?" * len(ACTIVE))
            return self._jobs(f"WHERE model = ? AND state IN ({marks})", (model, *ACTIVE))
        return self._jobs("WHERE model = ?", (model,))

    def _jobs(self, where: str, args: tuple) -> list[dict[str, object]]:
        cols = (
            "id, model, submitted_by, created, state, message, progress, version, labels, "
            "result, updated"
        )
        with self._lock:
            cur = self._db.execute(f"SELECT {cols} FROM jobs {where} ORDER BY created DESC", args)
            rows = cur.fetchall()
        names = [c.strip() for c in cols.split(",")]
        return [dict(zip(names, r)) for r in rows]

    def audit(self, who: str, action: str, model: str, detail: str = "") -> None:
        """Append one line to the audit trail."""
        with self._write() as db:
            db.execute(
                "INSERT INTO audit (created, who, action, model, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), who, action, model, detail),
            )

    def audit_trail(self, model: str) -> list[tuple[float, str, str, str]]:
        """``(time, who, action, detail)`` of ``model``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT created, who, action, detail FROM audit WHERE model = ? ORDER BY seq",
                (model,),
            ).fetchall()
        return [tuple(r) for r in rows]
