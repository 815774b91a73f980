"""Ray Serve application: one model bundle behind a FastAPI ingress with dynamic batching.

    serve run serve/config.yaml                      # bundle path in the config's args
    serve run medcae.serving.app:build_app bundle=runs/demo/bundle

Endpoints: ``POST /v1/predict`` (one image: raw body or multipart ``file``),
``POST /v1/predict/batch`` (multipart files, or JSON ``{"images": [base64, ...]}``),
``POST /v1/explain`` (one image: the prediction and where its evidence lies),
``GET /v1/model``, ``GET /v1/model/card`` (the bundle's MODEL_CARD.md), ``GET /healthz``
(always open), ``GET /`` (a page to try the model, open; its API calls carry the key), the
OpenAPI schema at ``/openapi.json``; the ``/docs`` page only with ``MEDCAE_SERVE_DOCS=1`` in the
replica's environment.

With API keys configured (``api_keys_file`` / ``api_key_sha256`` arguments, or the environment;
see :mod:`medcae.serving.auth`), every endpoint but ``/healthz`` needs
``Authorization: Bearer <key>``:
401 without one, 403 with a wrong one, checked before the body is read.

Every request but ``/healthz`` must name this server in its ``Host`` header (``allowed_hosts``,
default the loopback names; else 400 ``bad_host``), so a DNS-rebinding page cannot reach a
loopback server. CORS headers are sent only for the origins in ``cors_origins`` (none by
default). An image the model fails on inside a dynamic batch is retried alone, so only its own
request fails (422 ``unprocessable_image``).
"""

import asyncio
import base64
import logging
import os
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve

from medcae.serving.api import (
    BatchResponse,
    ErrorResponse,
    ExplainResponse,
    Limits,
    PredictResponse,
    RequestError,
    model_id,
    model_info,
)
from medcae.serving.auth import check_bearer, load_key_hashes
from medcae.serving.http import PAGE_HEADERS, PAGE_HTML, PAGE_JS, read_images
from medcae.serving.middleware import Guard, configure_guard

log = logging.getLogger("medcae.serve")

ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    408: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}

_BINARY = {"type": "string", "format": "binary"}
# The bodies are read by hand (size caps before parsing), so the schema declares them here.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image: the raw file, or a multipart form with its `file`",
        "content": {
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
            "application/dicom": {"schema": _BINARY},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": _BINARY},
                    "required": ["file"],
                }
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Several images: base64 in JSON, or multipart `files`",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}
                    },
                    "required": ["images"],
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": _BINARY}},
                    "required": ["files"],
                }
            },
        },
    }
}


_DOCS = os.environ.get("MEDCAE_SERVE_DOCS", "") == "1"
app = FastAPI(
    title="medcae",
    version="1",
    description="CAE-on-frozen-CNN image classifier",
    docs_url="/docs" if _DOCS else None,
    redoc_url=None,
)


app.add_middleware(Guard)


@app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(name="medcae", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class MedcaeModel:
    """Loads one bundle per replica through ``Predictor.from_bundle``.

    Args:
        bundle: Bundle folder (from the Serve config's application arguments).
        max_batch_size: Most images the batcher groups into one forward pass.
        batch_wait_timeout_s: How long the batcher waits to fill a batch.
        limits: Overrides of :class:`medcae.serving.api.Limits` fields.
        device: ``cuda`` / ``cpu``; default: GPU when the replica has one.
        threads: Torch CPU threads; 0 keeps Ray's default (the replica's ``num_cpus``).
        runtime: Backbone runtime: ``auto`` (an exported graph on OpenVINO, else ONNX Runtime,
            on CPU; PyTorch on CUDA), ``torch``, ``onnxruntime`` or ``openvino``; the precision
            is the bundle's.
        api_keys_file: File of API key sha256 digests (:mod:`medcae.serving.auth`).
        api_key_sha256: Digests given directly; with the file and the environment's, any
            configured key opens the endpoints.
        allowed_hosts: Host header values accepted (``name``, ``*.domain``, ``*``); default
            ``$MEDCAE_ALLOWED_HOSTS``, else the loopback names.
        cors_origins: Origins sent CORS headers (``https://app.example.org``); default none.
        model: A registered model instead of ``bundle``: ``NAME``, ``NAME@ALIAS`` or
            ``NAME/VERSION`` (:mod:`medcae.registry.models`), fetched into this node's cache.
        registry_uri: Where ``model`` is registered (default ``$MLFLOW_TRACKING_URI``).
        follow_s: For a ``model`` named by an alias (or a bare name), how often the registry
            is asked which version it names now; a new one is loaded beside the old and then
            answers every request accepted after it (:mod:`medcae.serving.versions`). 0: never.
    """

    def __init__(
        self,
        bundle: str | None = None,
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        limits: dict[str, int] | None = None,
        device: str | None = None,
        threads: int = 0,
        runtime: str = "auto",
        api_keys_file: str | None = None,
        api_key_sha256: list[str] | None = None,
        allowed_hosts: list[str] | str | None = None,
        cors_origins: list[str] | str | None = None,
        model: str | None = None,
        registry_uri: str | None = None,
        follow_s: float = 10.0,
    ):
        import torch

        # Keys and hosts first: a bad setting fails the replica before the model loads.
        self.key_hashes = load_key_hashes(api_keys_file, api_key_sha256 or ())
        configure_guard(allowed_hosts, cors_origins)

        from medcae.inference.predictor import Predictor
        from medcae.registry.models import ModelRef, Registry, resolve_model
        from medcae.serving.versions import Follower, Loaded

        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")

        def load(resolved: Any) -> Loaded:
            predictor = Predictor.from_bundle(str(resolved.bundle), device, runtime)
            # A registered model answers as its name; a bundle folder as its content id.
            name = resolved.name if model else model_id(predictor.meta)
            return Loaded(predictor, name, resolved.version, predictor.extractor.cfg.resolution)

        resolved = resolve_model(model, bundle, registry_uri)  # fetched on this replica's node
        bundle = str(resolved.bundle)
        self.loaded = load(resolved)
        self.limits = Limits(**(limits or {}))
        self.follower = None
        ref = ModelRef.parse(model) if model else None
        if ref is not None and not ref.path and not ref.version and follow_s > 0:
            registry = Registry(registry_uri or os.environ["MLFLOW_TRACKING_URI"])
            self.follower = Follower(
                registry,
                ref,
                lambda: self.loaded.version,
                load,
                lambda new: setattr(self, "loaded", new),
                float(follow_s),
            )
        self._predict.set_max_batch_size(max_batch_size)
        self._predict.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info(
            "loaded %s version %s from %s on %s, backbone on %s (pid %d)",
            self.loaded.model_id,
            self.loaded.version,
            bundle,
            device,
            self.loaded.predictor.extractor.runtime,
            os.getpid(),
        )

    @property
    def predictor(self) -> Any:
        """The current version's predictor (a request keeps the one it was accepted with)."""
        return self.loaded.predictor

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict(self, items: list[tuple[Any, np.ndarray]]) -> list[dict[str, Any]]:
        """Dynamic batch: one forward pass per version for images from many concurrent
        requests; when it fails, each image alone, so only the request of a bad image gets
        its error."""
        from medcae.serving.versions import predict_grouped

        return await asyncio.to_thread(predict_grouped, items)

    async def _one(self, loaded: Any, image: np.ndarray, name: str = "image") -> dict[str, Any]:
        out = await self._predict((loaded, image))
        if isinstance(out, RequestError):
            raise RequestError(out.status, out.code, f"{name}: {out.detail}")
        return out

    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY
    )
    async def predict(self, request: Request) -> dict[str, Any]:
        """Classify one PNG, JPEG or DICOM image (raw body or multipart ``file``)."""
        check_bearer(request.headers.get("authorization"), self.key_hashes)
        loaded = self.loaded  # accepted by this version: answered by it
        (image,) = await read_images(request, self.limits, False, loaded.side)
        return {
            "model": loaded.model_id,
            "version": loaded.version,
            "prediction": await self._one(loaded, image),
        }

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY,
    )
    async def predict_batch(self, request: Request) -> dict[str, Any]:
        """Classify several images: multipart files, or JSON ``{"images": [base64, ...]}``."""
        check_bearer(request.headers.get("authorization"), self.key_hashes)
        loaded = self.loaded
        images = await read_images(request, self.limits, True, loaded.side)
        preds = await asyncio.gather(
            *(self._one(loaded, im, f"images[{i}]") for i, im in enumerate(images))
        )
        return {"model": loaded.model_id, "version": loaded.version, "predictions": list(preds)}

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses=ERRORS,
        openapi_extra=PREDICT_BODY,
    )
    async def explain(self, request: Request, label: str | None = None) -> dict[str, Any]:
        """Classify one image and show where the evidence lies: each code-map location's
        exact contribution to the class's score (``label``, default the predicted class),
        with a PNG of the map over the image as the model saw it."""
        check_bearer(request.headers.get("authorization"), self.key_hashes)
        loaded = self.loaded
        (image,) = await read_images(request, self.limits, False, loaded.side)
        return await asyncio.to_thread(self._explain, loaded, image, label)

    def _explain(self, loaded: Any, image: np.ndarray, label: str | None) -> dict[str, Any]:
        from medcae.data import encode_png
        from medcae.inference.explain import ExplainUnavailable, explain, heatmap_png

        predictor = loaded.predictor

        if label is not None and label not in predictor.label_names:
            raise RequestError(
                422, "unknown_label", f"{label!r}: the model knows {predictor.label_names}"
            )
        try:
            exp = explain(predictor, image, label)
        except ExplainUnavailable as err:
            raise RequestError(422, "no_explanation", str(err)) from err
        except Exception as err:  # the model failed on this image: its request alone fails
            raise RequestError(
                422, "unprocessable_image", f"the model could not process this image ({err})"
            ) from err
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return {
            "model": loaded.model_id,
            "version": loaded.version,
            "prediction": vars(exp.prediction),
            "explanation": {
                "label": exp.label,
                "contributions": exp.contributions.round(6).tolist(),
                "intercept": exp.intercept,
                "decision": exp.decision,
                "pool": exp.pool,
                "ood_threshold": predictor.ood_threshold,
                "heatmap_png": b64(heatmap_png(exp, 224)),
                "image_png": b64(encode_png(exp.image)),
            },
        }

    @app.get("/v1/model/card", response_class=PlainTextResponse, responses=ERRORS)
    async def model_card(self, request: Request) -> PlainTextResponse:
        """The bundle's MODEL_CARD.md: data, intended use, metrics with intervals, limits."""
        check_bearer(request.headers.get("authorization"), self.key_hashes)
        return PlainTextResponse(self.predictor.card, media_type="text/markdown; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The try-the-model page (no external assets; its API calls carry the key)."""
        return HTMLResponse(PAGE_HTML, headers=PAGE_HEADERS)

    @app.get("/static/page.js", include_in_schema=False)
    async def page_js(self) -> Response:
        """The page's script."""
        return Response(PAGE_JS, media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/v1/model", responses=ERRORS)
    async def model(self, request: Request) -> dict[str, Any]:
        """Backbone, tap, CAE shape, labels, metrics, creation time and versions."""
        check_bearer(request.headers.get("authorization"), self.key_hashes)
        loaded = self.loaded
        info = model_info(loaded.predictor.meta, loaded.model_id)
        return info | {"version": loaded.version, "pid": os.getpid()}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica is up and its model is loaded."""
        loaded = self.loaded
        return {"status": "ok", "model": loaded.model_id, "version": loaded.version}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run medcae.serving.app:build_app bundle=...`` and config
    files."""
    if "bundle" not in args and "model" not in args:
        raise ValueError(
            "serve app needs the argument 'bundle' (a bundle folder) or 'model' (NAME@ALIAS, "
            "with 'registry_uri')"
        )
    kwargs = {
        k: args[k]
        for k in (
            "bundle",
            "max_batch_size",
            "batch_wait_timeout_s",
            "limits",
            "device",
            "threads",
            "runtime",
            "api_keys_file",
            "api_key_sha256",
            "allowed_hosts",
            "cors_origins",
            "model",
            "registry_uri",
            "follow_s",
        )
        if k in args
    }
    if isinstance(kwargs.get("api_key_sha256"), str):  # `serve run ... api_key_sha256=a,b`
        kwargs["api_key_sha256"] = kwargs["api_key_sha256"].split(",")
    for key in ("max_batch_size", "threads"):
        if key in kwargs:
            kwargs[key] = int(kwargs[key])
    if "num_replicas" not in args:  # a Serve config's deployment settings (autoscaling) rule
        return MedcaeModel.bind(**kwargs)
    replicas = int(args["num_replicas"])
    if replicas < 1:
        raise ValueError(f"num_replicas {replicas}: expected at least 1")
    return MedcaeModel.options(num_replicas=replicas).bind(**kwargs)
