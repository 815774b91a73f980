"""An unlabeled pool addressed by opaque image ids, for labeling over HTTP.

The pool is listed once (a folder, glob, CSV or Parquet, as ``medcae suggest`` reads it); each
image gets an id derived from its listing id (``sha256`` of the path, or of the in-memory row's
id, first 16 hex digits). An image is served only by an id of this listing: a client never
names a path, so nothing outside the pool can be read through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medcae.data import DataError, Rows, list_unlabeled_rows


class PoolError(KeyError):
    """An id that is not an image of this pool."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not in the pool"


def image_id(listing_id: str) -> str:
    """The pool id of a listing id: 16 hex digits of its sha256."""
    return hashlib.sha256(listing_id.encode("utf-8")).hexdigest()[:16]


@dataclass
class LabelPool:
    """The images of one pool by id, in listing order.

    Attributes:
        source: What was listed.
        ids: Pool ids, in listing order.
        names: Each id's listing id (file path, or ``name:split/index``).
    """

    source: str
    ids: list[str]
    names: dict[str, str]
    _payload: dict[str, Any]

    @classmethod
    def from_rows(cls, rows: Rows, source: str = "") -> LabelPool:
        """A pool of a listing (:func:`medcae.data.list_unlabeled_rows`)."""
        table = rows.table
        listing = [str(v) for v in table.column("id").to_pylist()]
        column = "path" if "path" in table.column_names else "data"
        payloads: Sequence[Any] = table.column(column).to_pylist()
        ids = [image_id(n) for n in listing]
        if len(set(ids)) != len(ids):
            raise DataError(f"{source or rows.name}: two images share an id; list them again")
        return cls(source or rows.name, ids, dict(zip(ids, listing)), dict(zip(ids, payloads)))

    @classmethod
    def from_source(cls, source: str, data_dir: str | None = None) -> LabelPool:
        """List ``source`` (a folder, glob, CSV, Parquet, ``.npz`` or data set name)."""
        return cls.from_rows(list_unlabeled_rows(source, data_dir), str(source))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image: object) -> bool:
        return image in self._payload

    def payload(self, image: str) -> str | bytes:
        """The file path of id ``image``, or its encoded bytes for an in-memory pool.

        Raises:
            PoolError: ``image`` is not an id of this pool.
        """
        if image not in self._payload:
            raise PoolError(f"no image {image!r} in the pool {self.source}")
        return self._payload[image]

    def image_bytes(self, image: str) -> bytes:
        """The encoded image of id ``image``.

        Raises:
            PoolError: ``image`` is not an id of this pool (whatever it looks like: a path,
                ``..``, a URL are never opened).
            DataError: The file can no longer be read.
        """
        if image not in self._payload:
            raise PoolError(f"no image {image!r} in the pool {self.source}")
        payload = self._payload[image]
        if isinstance(payload, bytes):
            return payload
        try:
            with open(payload, "rb") as fh:
                return fh.read()
        except OSError as err:
            raise DataError(f"{self.names[image]}: cannot read it ({err.strerror or err})") from err
