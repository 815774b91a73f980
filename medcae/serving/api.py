"""HTTP request handling shared by the Ray Serve app and the plain-FastAPI baseline (no Ray).

Validation turns every bad request into a :class:`RequestError` with a 4xx status and a JSON
body ``{"error": code, "detail": message}``; the schemas document the responses.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from medcae.data import (
    ImageDecodeError,
    ImageTooLargeError,
    NonFinitePixelsError,
    NoPixelDataError,
    decode_image,
    read_header,
)

log = logging.getLogger(__name__)

SUPPORTED = "PNG, JPEG or DICOM"
_OTHER_FORMATS = {
    b"GIF8": "GIF",
    b"%PDF": "PDF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "RIFF/WebP",
}


class RequestError(Exception):
    """A client error: HTTP ``status``, a short machine ``code`` and a human ``detail``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail

    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"error": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Limits:
    """Request limits.

    Attributes:
        max_image_bytes: Largest accepted encoded image.
        max_pixels: Largest accepted decoded image (width x height x frames), checked from
            the image's header before it is decoded.
        max_decoded_bytes: Largest accepted decoded image in bytes (pixels x samples x bytes
            per sample), checked from the header before decoding.
        max_request_decoded_bytes: Most decoded bytes of all the images of one request
            together, checked from their headers before any of them is decoded.
        max_batch_images: Most images in one ``/v1/predict/batch`` request.
        max_request_bytes: Largest request body of a batch (a single image's body may hold
            ``max_image_bytes`` plus 64 KiB of multipart framing). Refused from the
            Content-Length header, and by a cap on the streamed body, before it is all read.
        body_timeout_s: Longest wait for the next chunk of a request body; a stalled upload
            gets 408 ``body_timeout`` and gives its slot back.
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_request_decoded_bytes: int = 512 * 1024 * 1024
    max_batch_images: int = 32
    max_request_bytes: int = 64 * 1024 * 1024
    body_timeout_s: float = 5.0

    def body_cap(self, batch: bool) -> int:
        """The most bytes a request body may hold."""
        return self.max_request_bytes if batch else self.max_image_bytes + 64 * 1024


def check_declared_length(header: str | None, cap: int) -> None:
    """Refuse a body from its Content-Length header alone, before any of it is read.

    Raises:
        RequestError: 400 for a header that is not a whole number, 413 over ``cap``.
    """
    if header is None:
        return
    try:
        declared = int(header)
    except ValueError as err:
        raise RequestError(400, "bad_content_length", f"Content-Length {header[:20]!r}") from err
    if declared > cap:
        raise RequestError(
            413, "too_large", f"body of {declared} bytes is over the limit of {cap} bytes"
        )


def check_streamed_length(size: int, cap: int) -> None:
    """The cap on a body read in chunks (no, or a false, Content-Length)."""
    if size > cap:
        raise RequestError(413, "too_large", f"body is over the limit of {cap} bytes")


def sniff(data: bytes) -> str:
    """Name the format of encoded image bytes from their magic numbers.

    Returns:
        ``png``, ``jpeg``, ``dicom``, or the name of an unsupported format (``GIF``, ``PDF``,
        ...), or ``unknown``.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return next(
        (name for magic, name in _OTHER_FORMATS.items() if data.startswith(magic)), "unknown"
    )


def decode_request_image(
    data: bytes, limits: Limits, name: str = "image", reduce_to: int | None = None
) -> np.ndarray:
    """Validate and decode one uploaded image.

    Args:
        data: The encoded bytes.
        limits: Size limits, checked from the image's header before it is decoded.
        name: How the image is named in error messages.
        reduce_to: The model's input side: a bigger image is shrunk by an integer block mean
            in its own type while decoding (as the feature store's images were).

    Returns:
        uint8 ``(H, W)`` or ``(H, W, 3)``.

    Raises:
        RequestError: 400 empty or corrupt (malformed DICOM headers, pixel data that does not
            match the header), 413 too large, 415 unsupported type, 422 DICOM without pixel
            data or NaN/infinite pixel values.
    """
    kind = _check_encoded(data, limits, name)
    with _decode_errors():
        return decode_image(
            data,
            source=f"{name} ({kind})",
            max_pixels=limits.max_pixels,
            max_bytes=limits.max_decoded_bytes,
            reduce_to=reduce_to,
        )


def decode_request_images(
    blobs: Sequence[tuple[str, bytes]], limits: Limits, reduce_to: int | None = None
) -> list[np.ndarray]:
    """Decode the images of one request, within its budget of decoded bytes.

    With more than one image, every header is read first and the request refused (413
    ``request_too_large``) when their decoded sizes add up to more than
    ``limits.max_request_decoded_bytes``, before any pixel is decoded.

    Args:
        blobs: ``(name, encoded bytes)`` per image.
        limits: Size limits.
        reduce_to: As in :func:`decode_request_image`.

    Raises:
        RequestError: As :func:`decode_request_image`, naming the image; or the 413.
    """
    if len(blobs) > 1:
        total = 0
        for name, data in blobs:
            kind = _check_encoded(data, limits, name)
            with _decode_errors():
                total += read_header(data, f"{name} ({kind})").nbytes
        if total > limits.max_request_decoded_bytes:
            raise RequestError(
                413,
                "request_too_large",
                f"the {len(blobs)} images decode to {total} bytes together, over the "
                f"request limit of {limits.max_request_decoded_bytes}",
            )
    return [decode_request_image(data, limits, name, reduce_to) for name, data in blobs]


def _check_encoded(data: bytes, limits: Limits, name: str) -> str:
    """The format of an upload, after its size and type checks."""
    if not data:
        raise RequestError(400, "empty_body", f"{name}: no bytes received; send a {SUPPORTED}")
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            413,
            "too_large",
            f"{name}: {len(data)} bytes is over the limit of {limits.max_image_bytes} bytes",
        )
    kind = sniff(data)
    if kind not in ("png", "jpeg", "dicom"):
        raise RequestError(
            415, "unsupported_media_type", f"{name}: looks like {kind}, expected {SUPPORTED}"
        )
    return kind


@contextmanager
def _decode_errors() -> Iterator[None]:
    """The decoder's errors as the HTTP errors they are."""
    try:
        yield
    except ImageTooLargeError as err:
        raise RequestError(413, "too_many_pixels", str(err)) from err
    except NoPixelDataError as err:
        raise RequestError(422, "no_pixel_data", str(err)) from err
    except NonFinitePixelsError as err:
        raise RequestError(422, "non_finite_pixels", str(err)) from err
    except ImageDecodeError as err:
        raise RequestError(400, "corrupt_image", str(err)) from err


def decode_b64_images(
    payload: Any, limits: Limits, reduce_to: int | None = None
) -> list[np.ndarray]:
    """Decode a JSON batch ``{"images": ["<base64>", ...]}``.

    Raises:
        RequestError: 422 on a malformed body, 413 over the batch limit, or any error of
            :func:`decode_request_images` (naming the image's index).
    """
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise RequestError(422, "bad_json", 'expected a JSON object {"images": ["<base64>", ...]}')
    check_batch_size(len(images), limits)
    blobs = []
    for i, text in enumerate(images):
        try:
            blobs.append((f"images[{i}]", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError) as err:
            raise RequestError(422, "bad_base64", f"images[{i}]: not valid base64") from err
    return decode_request_images(blobs, limits, reduce_to)


def predict_each(
    predict: Callable[[list[np.ndarray]], Sequence[Any]], images: list[np.ndarray]
) -> list[dict[str, Any] | RequestError]:
    """Predict a dynamic batch; if that fails, predict each image alone.

    One image the model cannot process then costs only its own request: its slot holds a
    :class:`RequestError` (422 ``unprocessable_image``) and every other image its prediction.

    Args:
        predict: ``Predictor.predict``: images -> objects with the prediction's fields.
        images: Decoded images of several requests.

    Returns:
        Per image, the prediction as a dict or the error its request gets.
    """
    try:
        return [vars(p) for p in predict(images)]
    except Exception as err:  # any failure of the model: find out which image caused it
        if len(images) == 1:
            log.warning("the model failed on one image: %s: %s", type(err).__name__, err)
            return [
                RequestError(
                    422,
                    "unprocessable_image",
                    f"the model could not process this image ({type(err).__name__}: {err})",
                )
            ]
        log.warning("a batch of %d failed (%s); predicting one at a time", len(images), err)
        return [out for im in images for out in predict_each(predict, [im])]


def check_batch_size(n: int, limits: Limits) -> None:
    """Reject an empty batch or one over ``limits.max_batch_images``."""
    if n == 0:
        raise RequestError(400, "empty_batch", "the batch holds no images")
    if n > limits.max_batch_images:
        raise RequestError(
            413,
            "batch_too_large",
            f"{n} images is over the batch limit of {limits.max_batch_images}",
        )


class PredictionOut(BaseModel):
    """One image's prediction."""

    label: str = Field(
        description="The decision at the model's operating point (the most probable class "
        "when the model has none, or several exclusive classes)"
    )
    probabilities: dict[str, float] = Field(
        description="Class name -> probability, calibrated on validation when the model is"
    )
    reconstruction_error: float = Field(description="CAE reconstruction MSE of the feature map")
    in_distribution: bool = Field(
        description="False when the error exceeds the bundle's "
        "threshold (99th percentile on validation)"
    )
    threshold: float | None = Field(
        default=None,
        description="The operating point's threshold on the positive class's probability "
        "(label is positive at or above it); null when the label is the most probable class",
    )
    positive: str | None = Field(default=None, description="The class the threshold applies to")
    findings: dict[str, bool] | None = Field(
        default=None,
        description="A multi-label model: each finding's decision at its own threshold "
        "(label joins the present ones with '|', or says 'no finding')",
    )
    thresholds: dict[str, float] | None = Field(
        default=None, description="A multi-label model: each finding's threshold"
    )


class Answered(BaseModel):
    """What every answer names: the model and version that answered, and the request."""

    model: str
    version: str
    request_id: str = Field(description="Also the X-Request-ID header; in the answer log")


class PredictResponse(Answered):
    """Response of ``POST /v1/predict``."""

    prediction: PredictionOut


class BatchResponse(Answered):
    """Response of ``POST /v1/predict/batch``."""

    predictions: list[PredictionOut]


class ExplanationOut(BaseModel):
    """Where the evidence for one class lies (see :mod:`medcae.inference.explain`)."""

    label: str = Field(description="The explained class")
    contributions: list[list[float]] = Field(
        description="Per code-map location, its exact contribution to the class's decision"
    )
    intercept: float = Field(description="The class's intercept: contributions + it = decision")
    decision: float = Field(description="The class's decision value (logit)")
    pool: str = Field(description="How the code map became the classifier's vector")
    ood_threshold: float = Field(description="The bundle's reconstruction-error threshold")
    heatmap_png: str = Field(description="Base64 PNG: the map drawn over the model's view")
    image_png: str = Field(description="Base64 PNG: the image as the model saw it")


class ExplainResponse(Answered):
    """Response of ``POST /v1/explain``."""

    prediction: PredictionOut
    explanation: ExplanationOut


class VersionOut(BaseModel):
    """One version of a served model."""

    version: str
    aliases: list[str]
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelOut(BaseModel):
    """One model a server answers for."""

    name: str = Field(description="As in /v1/models/{name}/...")
    default: bool = Field(description="Whether /v1/predict and the other /v1/... routes use it")
    ref: str = Field(description="What it loads: NAME, NAME@ALIAS, NAME/VERSION or a folder")
    registered: bool = Field(description="In a model registry (else a bundle folder)")
    versions: list[VersionOut]


class ModelsResponse(BaseModel):
    """Response of ``GET /v1/models``."""

    default: str
    models: list[ModelOut]


class ShareOut(BaseModel):
    """An observed share next to what the validation split leads one to expect."""

    observed: float = Field(description="Share of the answers in the window")
    expected: float = Field(
        description="A label's share of the validation split; for OOD, 1 - the threshold's quantile"
    )
    band: float = Field(description="Largest distance from the expected share not flagged")
    flagged: bool


class StatsResponse(BaseModel):
    """Response of ``GET /v1/models/{name}/stats``: the replica's last answers."""

    model: str
    version: str
    answers: int = Field(description="Answers in the window (at most `window`)")
    window: int
    versions_in_window: list[str]
    ood: ShareOut = Field(description="Share of answers out of distribution")
    labels: dict[str, ShareOut] = Field(description="Share of answers per predicted label")
    flagged: bool
    enough_answers: bool = Field(description="Whether there were enough answers to flag")
    replica_pid: int


class ErrorResponse(BaseModel):
    """Body of every 4xx response."""

    error: str
    detail: str


def model_info(meta: dict[str, Any], model_id: str) -> dict[str, Any]:
    """What ``GET /v1/model`` returns, from a bundle's metadata."""
    cfg = meta.get("config", {})
    return {
        "id": model_id,
        "data": meta.get("data"),
        "label_names": meta.get("label_names"),
        "task": meta.get("task", "multiclass"),
        "operating_point": meta.get("operating_point"),
        "calibration": {
            k: v for k, v in (meta.get("calibration") or {}).items() if k not in ("val", "test")
        }
        or None,
        "backbone": cfg.get("backbone"),
        "cae": cfg.get("cae"),
        "classifier": meta.get("classifier"),
        "representation": meta.get("representation"),
        "metrics": meta.get("metrics", {}).get("test"),
        "ood": meta.get("ood"),
        "created": meta.get("created"),
        "versions": meta.get("versions"),
    }


def model_id(meta: dict[str, Any]) -> str:
    """A short stable identity of a bundle: data set, backbone and the CAE weights' hash."""
    digest = meta.get("files", {}).get("cae.pt", "")[:12]
    backbone = meta.get("config", {}).get("backbone", {}).get("name", "?")
    return f"medcae-{meta.get('data', 'model')}-{backbone}-{digest}"
