"""Reading an HTTP request's images, and the page's assets (FastAPI, no Ray).

Shared by the Ray Serve app (:mod:`medcae.serving.app`) and the single-process baseline
(:mod:`medcae.serving.baseline`). The page ships inside the package (``static/``), so an
installed medcae serves it from any working folder.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Request

from medcae.serving.api import (
    Limits,
    RequestError,
    check_batch_size,
    check_declared_length,
    check_streamed_length,
    decode_b64_images,
    decode_request_image,
    decode_request_images,
)

_STATIC = resources.files("medcae.serving") / "static"
PAGE_HTML = (_STATIC / "page.html").read_text(encoding="utf-8")
PAGE_JS = (_STATIC / "page.js").read_text(encoding="utf-8")
# The page loads only its own script and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body, refused (413) from its Content-Length, or as soon as the streamed
    chunks pass ``cap``: an oversized upload is never held whole. A client that sends nothing
    for ``timeout_s`` gets 408, so stalled uploads do not keep the replica's request slots."""
    check_declared_length(request.headers.get("content-length"), cap)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError as err:
            raise RequestError(
                408, "body_timeout", f"no body bytes for {timeout_s:g}s after {size} bytes"
            ) from err
        size += len(chunk)
        check_streamed_length(size, cap)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_form(request: Request, body: bytes, limits: Limits) -> Any:
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> Any:
        yield body

    parser = MultiPartParser(
        request.headers, once(), max_files=limits.max_batch_images + 1, max_fields=16
    )
    try:
        return await parser.parse()
    except MultiPartException as err:
        raise RequestError(400, "bad_multipart", str(err)) from err


async def read_images(
    request: Request, limits: Limits, batch: bool, reduce_to: int | None = None
) -> list[np.ndarray]:
    """Decode the images of a request: raw body, multipart files, or (batch) base64 JSON.

    Decoding runs in a worker thread, so a slow image never stalls the event loop; a bigger
    image than the model's input side ``reduce_to`` is shrunk while it is decoded.
    """
    ctype = request.headers.get("content-type", "")
    body = await read_body(request, limits.body_cap(batch), limits.body_timeout_s)
    if ctype.startswith("multipart/form-data"):
        form = await _parse_form(request, body, limits)
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not batch and len(files) != 1:
            raise RequestError(400, "bad_multipart", f"expected 1 file, got {len(files)}")
        check_batch_size(len(files), limits)
        blobs = []
        for i, f in enumerate(files):
            name = f.filename or f"files[{i}]"
            if (f.size or 0) > limits.max_image_bytes:
                raise RequestError(
                    413, "too_large", f"{name}: over the limit of {limits.max_image_bytes} bytes"
                )
            blobs.append((name, await f.read()))
        return await asyncio.to_thread(decode_request_images, blobs, limits, reduce_to)
    if batch:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            detail = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise RequestError(422, "bad_json", f"body is not valid JSON: {detail}") from err
        return await asyncio.to_thread(decode_b64_images, payload, limits, reduce_to)
    return [await asyncio.to_thread(decode_request_image, body, limits, "image", reduce_to)]
