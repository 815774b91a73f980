"""The labeling loop of one served model, as the server runs it (Ray-free).

:class:`Loop` ties together the pool (:mod:`medcae.labeling.pool`), the label store with its
leases, jobs and audit trail (:mod:`medcae.labeling.store`), the queue
(:mod:`medcae.labeling.queue`) and the retraining job (``medcae retrain``,
:mod:`medcae.cli.retrain`), submitted through a job runner: an object with ``submit(job_id,
entrypoint)``, ``status(job_id) -> (state, message)`` and ``logs(job_id) -> str``
(:class:`medcae.distributed.jobs.RayJobs`: the Ray Jobs API of the cluster the server runs on).

Everything a client may get goes through these methods, each given the caller's name for the
labels and the audit trail; the HTTP layer checks roles before it calls them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medcae.labeling.pool import LabelPool, PoolError
from medcae.labeling.queue import PoolPredictions, label_counts, predict_pool
from medcae.labeling.retrain import HELD_OUT_SHARE, held_out, label_values
from medcae.labeling.store import ACTIVE, LEASE_S, LabelStore

#: The retraining job's last line: its result as JSON (:mod:`medcae.cli.retrain`).
RESULT_TAG = "MEDCAE_RETRAIN"
#: Registry tags the retraining job sets on its version.
COMPARE_TAG, PARENT_TAG, JOB_TAG = "medcae.compare", "medcae.parent", "medcae.job"
#: A job still ``SUBMITTING`` this long after it was claimed was lost with its server.
SUBMIT_GRACE_S = 120.0
MAX_QUEUE = 50
#: A ranking is reused until this many labels were added since it was made (``typiclust``
#: clusters the whole pool: seconds at 20,000 images; the others are cheap either way).
RERANK_EVERY = 10
#: How deep a ranking goes (beyond the leases of others).
RANK_DEPTH = 50
#: ``typiclust`` clusters a sample of this many unlabeled images of a larger pool.
CLUSTER_SAMPLE = 4000


class LoopError(Exception):
    """A request the loop refuses: an HTTP ``status``, a ``code`` and a message."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class JobRunner(Protocol):
    def submit(self, job_id: str, entrypoint: str) -> None: ...
    def status(self, job_id: str) -> tuple[str, str]: ...
    def logs(self, job_id: str) -> str: ...


@dataclass(frozen=True)
class Model:
    """What the loop needs of the version being served: its predictor, version and names."""

    predictor: Any
    version: str
    names: list[str]
    multilabel: bool
    thresholds: np.ndarray | None
    side: int

    @classmethod
    def of(cls, predictor: Any, version: str) -> Model:
        """The view of a :class:`medcae.inference.predictor.Predictor` serving ``version``."""
        thresholds = None
        if predictor.finding_points is not None:
            thresholds = np.asarray([op.threshold for op in predictor.finding_points], float)
        return cls(
            predictor,
            version,
            list(predictor.label_names),
            predictor.multilabel,
            thresholds,
            predictor.extractor.cfg.resolution,
        )


class Loop:
    """The labeling loop of one model.

    Args:
        model: The served model's name (labels are kept under it).
        registered: The registry name retrained and promoted (None: a bundle folder, which
            labels but cannot train).
        pool: The pool source (a folder, glob, CSV or Parquet).
        state_dir: The server's state folder: ``labels.db`` (labels, leases, jobs, audit) and
            ``jobs/<id>/`` (each job's labels snapshot and run folder); shared by the replicas
            and seen by the node that runs the jobs.
        registry_uri: The registry of ``registered``.
        runner: Submits and watches jobs (None: training is off).
        train_args: Extra ``medcae retrain`` flags (``--epochs 5 --num-workers 2``).
        data_dir: Where data set names are looked up (for the job).
        held_out_share: The share of labels held out for the comparison.
    """

    def __init__(
        self,
        model: str,
        registered: str | None,
        pool: str,
        state_dir: str | Path,
        registry_uri: str | None = None,
        runner: JobRunner | None = None,
        train_args: Sequence[str] = (),
        data_dir: str | None = None,
        held_out_share: float = HELD_OUT_SHARE,
    ):
        self.model, self.registered, self.source = model, registered, pool
        self.state_dir = Path(state_dir)
        self.pool = LabelPool.from_source(pool, data_dir)
        self.store = LabelStore(self.state_dir / "labels.db")
        self.registry_uri, self.runner = registry_uri, runner
        self.train_args, self.data_dir = list(train_args), data_dir
        self.held_out_share = held_out_share
        self._preds: dict[str, PoolPredictions] = {}
        self._orders: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ queue and labels

    def predictions(self, m: Model) -> PoolPredictions:
        """The pool through version ``m`` (once per version: in memory, and in
        ``state_dir/pools/`` across restarts)."""
        with self._lock:
            if m.version not in self._preds:
                self._preds = {m.version: self._load_or_predict(m)}  # one version held
            return self._preds[m.version]

    def _cache_path(self, version: str) -> Path:
        import hashlib

        digest = hashlib.sha256("\n".join(self.pool.ids).encode()).hexdigest()[:12]
        return self.state_dir / "pools" / f"{self.model}-{version}-{digest}.npz"

    def _load_or_predict(self, m: Model) -> PoolPredictions:
        path = self._cache_path(m.version)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return PoolPredictions(
                        list(self.pool.ids),
                        z["proba"],
                        z["vectors"],
                        z["in_distribution"],
                        [str(x) for x in z["labels"]],
                    )
            except (OSError, ValueError, KeyError):
                pass  # unreadable: predicted again below, and rewritten
        preds = predict_pool(m.predictor, self.pool)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                proba=preds.proba,
                vectors=preds.vectors,
                in_distribution=preds.in_distribution,
                labels=np.asarray(preds.labels, dtype=str),
            )
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        return preds

    def queue(
        self, m: Model, k: int, who: str, strategy: str = "hybrid", lease_s: float = LEASE_S
    ) -> list[dict[str, Any]]:
        """The next ``k`` images for ``who``, leased, with the model's prediction of each."""
        from medcae.labeling.strategies import STRATEGIES

        if not 1 <= k <= MAX_QUEUE:
            raise LoopError(422, "bad_k", f"k={k}: expected 1 to {MAX_QUEUE}")
        if strategy not in STRATEGIES:
            raise LoopError(
                422,
                "unknown_strategy",
                f"strategy {strategy!r}: expected one of {sorted(STRATEGIES)}",
            )
        preds = self.predictions(m)
        ids = self._next(m, preds, k, who, strategy, lease_s)
        row = self._rows(preds)
        return [
            {
                "image_id": i,
                "predicted": preds.labels[row[i]],
                "proba": {n: round(float(p), 6) for n, p in zip(m.names, preds.proba[row[i]])},
            }
            for i in ids
        ]

    def _rows(self, preds: PoolPredictions) -> dict[str, int]:
        if getattr(self, "_row_of", (None,))[0] is not preds:
            self._row_of = (preds, {i: n for n, i in enumerate(preds.ids)})
        return self._row_of[1]

    def _next(
        self, m: Model, preds: PoolPredictions, k: int, who: str, strategy: str, lease_s: float
    ) -> list[str]:
        """:func:`medcae.labeling.queue.next_images`, with the ranking kept for
        :data:`RERANK_EVERY` labels (per version and strategy)."""
        from medcae.labeling.queue import rank

        labeled = {i: lab.label for i, lab in self.store.current(self.model).items()}
        held = self.store.leases(self.model)
        mine = [i for i, w in held.items() if w == who and i not in labeled]
        others = sum(1 for w in held.values() if w != who)
        key = (m.version, strategy)
        cached = self._orders.get(key)
        fresh = cached is not None and len(labeled) - cached[0] < RERANK_EVERY
        if fresh:
            order = [i for i in cached[1] if i not in labeled]
            fresh = len(order) >= k + others or len(cached[1]) >= len(preds.ids)

        def ranked(depth: int | None) -> list[str]:
            out = rank(
                preds,
                labeled,
                m.names,
                strategy,
                thresholds=m.thresholds,
                k=depth,
                cluster_sample=CLUSTER_SAMPLE,
            )
            self._orders[key] = (len(labeled), out)
            return out

        if not fresh:
            order = ranked(min(len(preds.ids), RANK_DEPTH + others + k))
        picked = [i for i in order if i not in mine]
        got = self.store.lease(self.model, mine + picked, k, who, lease_s)
        if len(got) < k and len(order) < len(preds.ids):  # many skipped: the whole pool
            order = ranked(None)
            got = self.store.lease(self.model, mine + order, k, who, lease_s)
        return got

    def image_png(self, image_id: str, side: int) -> bytes:
        """The pool image ``image_id`` as the model sees it (decoded, resized, RGB), PNG.

        Raises:
            LoopError: 404 for an id that is not this pool's (never a path), 422 for an image
                that no longer decodes.
        """
        from medcae.data import DataError, decode_image, encode_png
        from medcae.data.preprocess import prepare_image

        try:
            data = self.pool.image_bytes(image_id)
            image = decode_image(data, source=image_id, reduce_to=side)
        except PoolError as err:
            raise LoopError(404, "unknown_image", str(err)) from err
        except DataError as err:
            raise LoopError(422, "unreadable_image", str(err)) from err
        return encode_png(prepare_image(image, side))

    def add_label(self, m: Model, image_id: str, label: str, who: str) -> dict[str, Any]:
        """Keep ``who``'s label of ``image_id`` (``""``: undo); returns it once on disk.

        Raises:
            LoopError: 404 unknown image, 422 a label that is not one of the model's classes
                (findings: ``A|B`` or ``No Finding``).
        """
        from medcae.data import DataError

        if image_id not in self.pool:
            raise LoopError(
                404, "unknown_image", f"no image {image_id!r} in the pool {self.source}"
            )
        if not isinstance(label, str):
            raise LoopError(
                422, "bad_label", f"label: expected a string, got {type(label).__name__}"
            )
        label = label.strip()
        if label:
            try:
                label_values([label], m.names, m.multilabel, "label")
            except DataError as err:
                raise LoopError(422, "unknown_label", str(err)) from err
        saved = self.store.add(self.model, image_id, label, who, m.version)
        if not label:
            self.store.audit(who, "undo", self.model, image_id)
        return {
            "image_id": image_id,
            "label": label,
            "annotator": who,
            "version": m.version,
            "seq": saved.seq,
        }

    def skip(self, image_id: str, who: str) -> None:
        """Give ``who``'s lease of ``image_id`` back; ``who`` is not handed it again within a
        lease's time (another annotator may be)."""
        if image_id not in self.pool:
            raise LoopError(
                404, "unknown_image", f"no image {image_id!r} in the pool {self.source}"
            )
        self.store.release(self.model, image_id, who, skip_s=LEASE_S)
        self.store.audit(who, "skip", self.model, image_id)

    def progress(self, m: Model) -> dict[str, Any]:
        """Labels per class (per finding), how many labeled, how many are left to label."""
        current = {i: lab.label for i, lab in self.store.current(self.model).items()}
        counts = label_counts(current, m.names, m.multilabel)
        preds = self._preds.get(m.version)
        queueable = None
        if preds is not None:
            labeled = np.isin(preds.ids, list(current))
            queueable = int((preds.in_distribution & ~labeled).sum())
        return {
            "pool": len(self.pool),
            "labeled": len(current),
            "per_class": {n: int(c) for n, c in zip(m.names, counts)},
            "left": queueable,
        }

    def export_csv(self) -> str:
        """The current labels as the CSV ``medcae run`` reads (``path,label``), with the image
        id, who labeled, the version that suggested it and when."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "image_id", "annotator", "version", "created"])
        for i, lab in sorted(self.store.current(self.model).items(), key=lambda kv: kv[1].seq):
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lab.created))
            w.writerow([self.pool.names[i], lab.label, i, lab.annotator, lab.version, created])
        return buf.getvalue()

    # ------------------------------------------------------------------ jobs

    def train(self, who: str) -> dict[str, Any]:
        """Submit a retraining job on the labels so far.

        Raises:
            LoopError: 409 ``job_running`` (naming it) while one runs, 422 without labels,
                503 when the server cannot train (no registered model, no job runner) or the
                submission failed.
        """
        if self.runner is None or not self.registered or not self.registry_uri:
            raise LoopError(
                503,
                "training_off",
                f"{self.model}: training needs a registered model (NAME@champion) and the "
                "server's Ray cluster (Jobs API)",
            )
        for job in self.store.jobs(self.model, active=True):
            self._refresh(job)
        current = self.store.current(self.model)
        if not current:
            raise LoopError(422, "no_labels", f"{self.model}: label some images first")
        job_id = f"medcae-{self.model}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        busy = self.store.claim_job(self.model, job_id, who, len(current))
        if busy:
            raise LoopError(409, "job_running", f"job {busy} of {self.model} is running: {busy}")
        self.store.audit(who, "train", self.model, job_id)
        folder = self.state_dir / "jobs" / job_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            snapshot = folder / "labels.csv"
            with open(snapshot, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(["image_id", "label", "split"])
                for i, lab in sorted(current.items()):
                    split = "test" if held_out(i, self.held_out_share) else "train"
                    w.writerow([i, lab.label, split])
            self.runner.submit(job_id, self._entrypoint(job_id, snapshot, folder))
        except Exception as err:  # noqa: BLE001 - the job is marked failed and the client told
            msg = f"could not submit the job: {type(err).__name__}: {err}"
            self.store.update_job(job_id, state="FAILED", message=msg)
            raise LoopError(503, "submit_failed", msg) from err
        self.store.update_job(job_id, state="PENDING", progress="submitted")
        return self.job(job_id)

    def _entrypoint(self, job_id: str, snapshot: Path, folder: Path) -> str:
        args = [
            sys.executable,
            "-m",
            "medcae",
            "retrain",
            "--model",
            str(self.registered),
            "--mlflow",
            str(self.registry_uri),
            "--labels",
            str(snapshot.resolve()),
            "--pool",
            self.source,
            "--out",
            str((folder / "run").resolve()),
            "--job-id",
            job_id,
            *(["--data-dir", self.data_dir] if self.data_dir else []),
            *self.train_args,
        ]
        return " ".join(shlex.quote(a) for a in args)

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's state, progress line, why it failed, and when done its version.

        Raises:
            LoopError: 404 for a job of another model or none.
        """
        row = self.store.job(job_id)
        if row is None or row["model"] != self.model:
            raise LoopError(404, "unknown_job", f"no job {job_id!r} of {self.model}")
        return self._public(self._refresh(row))

    def jobs(self) -> list[dict[str, Any]]:
        """This model's jobs, newest first."""
        return [self._public(self._refresh(r)) for r in self.store.jobs(self.model)[:20]]

    def _refresh(self, row: dict[str, Any]) -> dict[str, Any]:
        """Ask the runner about a job that is not finished, and record what it says."""
        if row["state"] not in ACTIVE or self.runner is None:
            return row
        job_id = str(row["id"])
        state, message = self.runner.status(job_id)
        if state == "UNKNOWN":
            if (
                row["state"] == "SUBMITTING"
                and time.time() - float(row["created"]) > SUBMIT_GRACE_S
            ):
                state, message = "FAILED", "the server stopped before the job was submitted"
            else:
                return row
        fields: dict[str, Any] = {"state": state}
        logs = self.runner.logs(job_id)
        fields["progress"] = _last_line(logs)
        if state == "SUCCEEDED":
            result = _result(logs)
            if result is None:
                state = fields["state"] = "FAILED"
                message = f"the job ended without its {RESULT_TAG} line"
            else:
                fields["version"] = str(result.get("version"))
                fields["result"] = json.dumps(result, default=float)
        if state in ("FAILED", "STOPPED"):
            fields["message"] = _why(message, logs)
        self.store.update_job(job_id, **fields)
        return self.store.job(job_id) or row

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        result = json.loads(row["result"]) if row.get("result") else None
        return {
            "job_id": row["id"],
            "model": row["model"],
            "state": row["state"],
            "submitted_by": row["submitted_by"],
            "created": row["created"],
            "labels": row["labels"],
            "progress": row["progress"],
            "message": row["message"],
            "version": row["version"],
            "seconds": round(
                (float(row["updated"]) if row["state"] not in ACTIVE else time.time())
                - float(row["created"]),
                1,
            ),
            "comparison": (result or {}).get("compare"),
            "worker_nodes": (result or {}).get("worker_nodes"),
        }

    # ------------------------------------------------------------------ compare and promote

    def compare(self) -> dict[str, Any]:
        """The challenger against the champion, as the challenger's job measured them on the
        same held-out images.

        Raises:
            LoopError: 404 without a challenger, 503 without a registry.
        """
        registry = self._registry()
        versions = registry.versions(str(self.registered))
        by_alias = {a: v for v in versions for a in v.aliases}
        champion, challenger = by_alias.get("champion"), by_alias.get("challenger")
        if challenger is None:
            raise LoopError(404, "no_challenger", f"{self.registered} has no @challenger yet")
        text = challenger.tags.get(COMPARE_TAG)
        comparison = json.loads(text) if text else None
        parent = challenger.tags.get(PARENT_TAG)
        return {
            "model": self.model,
            "champion": champion.version if champion else None,
            "challenger": challenger.version,
            "compared_with": parent,
            "current": bool(champion and parent == champion.version),
            "promoted": bool(champion and champion.version == challenger.version),
            "job": challenger.tags.get(JOB_TAG),
            "comparison": comparison,
            "metrics": {
                "champion": champion.metrics if champion else {},
                "challenger": challenger.metrics,
            },
        }

    def promote(self, version: str, who: str) -> dict[str, Any]:
        """Make ``version`` the champion.

        Raises:
            LoopError: 404 for a version the model does not have.
        """
        from medcae.registry.models import RegistryError

        registry = self._registry()
        known = {v.version for v in registry.versions(str(self.registered))}
        if str(version) not in known:
            raise LoopError(
                404,
                "unknown_version",
                f"{self.registered} has no version {version!r} (it has {sorted(known, key=int)})",
            )
        try:
            info = registry.promote(str(self.registered), str(version), "champion")
        except RegistryError as err:
            raise LoopError(503, "registry_error", str(err)) from err
        self.store.audit(who, "promote", self.model, str(version))
        return {"model": self.model, "champion": info.version, "promoted_by": who}

    def _registry(self) -> Any:
        from medcae.registry.models import Registry

        if not self.registered or not self.registry_uri:
            raise LoopError(503, "no_registry", f"{self.model} is not a registered model")
        return Registry(self.registry_uri)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACTOR = re.compile(r"^\((\w+)(?: pid=[^)]*)?\)\s*")


def _last_line(logs: str) -> str:
    """The job's last console line (its progress): colours and the ``(Actor pid=...)``
    prefix of a worker's line removed; Ray's own warnings and the result line skipped."""
    for line in reversed(logs.splitlines()):
        line = _ANSI.sub("", line).strip()
        actor = _ACTOR.match(line)
        if actor:
            if actor.group(1) in ("raylet", "autoscaler"):
                continue
            line = line[actor.end() :]
        skip = (RESULT_TAG, "log:", "[")  # the result, the log's path, Ray's own lines
        if line and not line.startswith(skip) and "core_worker" not in line:
            return line[:300]
    return ""


def _result(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_TAG + " "):
            try:
                return json.loads(line[len(RESULT_TAG) + 1 :])
            except ValueError:
                return None
    return None


def _why(message: str, logs: str) -> str:
    """Why a job failed: the runner's message, and the job's own ``error:`` line if any."""
    error = next(
        (ln.strip() for ln in reversed(logs.splitlines()) if ln.strip().startswith("error:")), ""
    )
    parts = [p for p in (error, (message or "").strip()) if p]
    return " | ".join(parts)[:1000] or "failed"
