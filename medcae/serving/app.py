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
    ModelsResponse,
    PredictResponse,
    RequestError,
    StatsResponse,
    model_info,
)
from medcae.serving.auth import authorize, load_keys
from medcae.serving.http import PAGE_HEADERS, PAGE_HTML, PAGE_JS, read_images
from medcae.serving.metrics import RequestMetrics
from medcae.serving.middleware import Guard, configure_guard

log = logging.getLogger("medcae.serve")

ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    408: {"model": ErrorResponse},
    413: {"model": ErrorResponse},
    415: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
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
app.add_middleware(RequestMetrics)  # outermost: counts what the guard refuses, too


@app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@serve.deployment(name="medcae", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class MedcaeModel:
    """Serves one or several models; each replica loads them on demand (Serve's model
    multiplexing, least recently used out) and batches images of one model version together.

    Args:
        bundle: A bundle folder: the one model (as ``models: [bundle]``).
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
        model: One model (as ``models: [model]``).
        models: The models served, the first the default: ``NAME``, ``NAME@ALIAS``,
            ``NAME/VERSION`` (registered), bundle folders, each optionally ``LABEL=REF``
            (:mod:`medcae.serving.catalog`); registered ones are fetched into this node's cache.
        registry_uri: Where registered models live (default ``$MLFLOW_TRACKING_URI``).
        follow_s: For a model named by an alias (or a bare name), how often the registry is
            asked which version it names now; a new one is loaded beside the old and then
            answers every request accepted after it (:mod:`medcae.serving.versions`). 0: never.
        models_per_replica: Most models (or versions asked for by requests) a replica holds.
        log_dir: Folder of the answer logs (:mod:`medcae.serving.answers`); none: no log.
        stats_window: Answers per model that ``/v1/models/{name}/stats`` summarises.
        pools: Labeling pools, ``NAME=PATH`` (a bare ``PATH``: the default model's); each
            turns on the labeling loop of its model (:mod:`medcae.labeling.service`).
        state_dir: The loop's state: ``labels.db`` and the jobs' folders (default ``state``).
        jobs_address: The Ray dashboard that takes retraining jobs (``http://host:8265``);
            none: labeling without training.
        train_args: Extra ``medcae retrain`` flags of every job (``--epochs 5``).
        data_dir: Where a retraining job looks up data set names.
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
        models: list[str] | str | None = None,
        registry_uri: str | None = None,
        follow_s: float = 10.0,
        models_per_replica: int = 4,
        log_dir: str | None = None,
        stats_window: int = 1000,
        pools: list[str] | str | None = None,
        state_dir: str | None = None,
        jobs_address: str | None = None,
        train_args: list[str] | str | None = None,
        data_dir: str | None = None,
    ):
        import torch

        from medcae.config import ConfigError
        from medcae.serving import metrics
        from medcae.serving.answers import AnswerLog
        from medcae.serving.catalog import build_specs

        # Keys and hosts first: a bad setting fails the replica before the model loads.
        self.keys = load_keys(api_keys_file, api_key_sha256 or ())
        configure_guard(allowed_hosts, cors_origins)
        if isinstance(models, str):
            models = [m for m in models.split(",") if m.strip()]
        self.specs = build_specs(list(models or []) or [r for r in (model or bundle,) if r])
        self.registry_uri = registry_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if any(s.registered for s in self.specs) and not self.registry_uri:
            raise ConfigError("registered models need registry_uri (or $MLFLOW_TRACKING_URI)")
        from ray.util import metrics as ray_metrics

        metrics.configure((s.name for s in self.specs), ray_metrics, self._serve_request_id)
        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.runtime, self.follow_s, self.stats_window = runtime, float(follow_s), stats_window
        self.limits = Limits(**(limits or {}))
        self.answers = AnswerLog(log_dir) if log_dir else None

        @serve.multiplexed(max_num_models_per_replica=int(models_per_replica))
        async def get_model(key: str) -> Any:
            return await asyncio.to_thread(self._load_key, key)

        self._get_model = get_model
        # The default model now: a replica that cannot load it fails at start, not later.
        self._extractors: dict[str, Any] = {}
        self._folder_versions: dict[str, str] = {}  # a bundle folder's one version
        self._preloaded: dict[str, Any] = {}
        self._preloaded[self.specs[0].name] = self._load_key(self.specs[0].name)
        self.loops = self._make_loops(pools, state_dir, jobs_address, train_args, data_dir)
        for name in self.loops:  # the pool through the served version, before anyone asks
            self._warm(name, self._preloaded.get(name))
        self._predict.set_max_batch_size(max_batch_size)
        self._predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @staticmethod
    def _serve_request_id() -> str | None:
        """The id Serve gave the current request (its proxy returns it as ``X-Request-ID``).
        A method, not a module function: Serve ships this class by value."""
        try:
            return serve.context._get_serve_request_context().request_id
        except Exception:  # noqa: BLE001 - outside a Serve request
            return None

    def _load_version(self, resolved: Any, name: str) -> Any:
        from medcae.inference.predictor import Predictor
        from medcae.serving.versions import Loaded, backbone_key

        predictor = Predictor.from_bundle(str(resolved.bundle), self.device, self.runtime)
        key = backbone_key(predictor.meta, self.runtime)
        # Models and versions on one backbone share one extractor (memory, and one pass).
        predictor.extractor = self._extractors.setdefault(key, predictor.extractor)
        side = predictor.extractor.cfg.resolution
        return Loaded(predictor, name, resolved.version, side, key)

    def _load_key(self, key: str) -> Any:
        """Load a multiplexing key (``name``, ``name@alias``, ``name/version``)."""
        from medcae.registry.models import ModelRef, Registry, resolve_path
        from medcae.serving.catalog import Served, find, split_key
        from medcae.serving.versions import Follower

        if key in self._preloaded:
            return self._preloaded.pop(key)
        name, alias, version = split_key(key)
        spec = find(self.specs, name)
        if spec.registered:
            ref = ModelRef(spec.ref.name, alias, version) if alias or version else spec.ref
            registry = Registry(self.registry_uri or "")
            resolved = registry.resolve(ref)
        else:
            ref, registry = spec.ref, None
            resolved = resolve_path(ref)
        served = Served(name, key, self._load_version(resolved, name), self.stats_window)
        if registry is not None and not ref.version and self.follow_s > 0:
            served.follower = Follower(
                registry,
                ref,
                lambda: served.loaded.version,
                lambda r: self._load_version(r, name),
                lambda new: setattr(served, "loaded", new),
                self.follow_s,
            )
        log.info(
            "loaded %s version %s (%s) from %s on %s, backbone on %s (pid %d)",
            name,
            served.loaded.version,
            key,
            resolved.bundle,
            self.device,
            served.loaded.predictor.extractor.runtime,
            os.getpid(),
        )
        return served

    async def _served(
        self, name: str | None, version: str | None = None, alias: str | None = None
    ) -> Any:
        """The model a request names (None: the default), loaded on this replica."""
        from medcae.serving.catalog import find, variant

        spec = self.specs[0] if name is None else find(self.specs, name)
        key, _ = variant(spec, version, alias)
        try:
            return await self._get_model(key)
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - what the registry has, or why it failed
            from medcae.registry.models import BrokenVersionError, RegistryError

            if isinstance(err, RegistryError) and not isinstance(err, BrokenVersionError):
                raise RequestError(404, "unknown_version", str(err)) from err
            raise RequestError(
                503, "model_unavailable", f"{key}: could not load ({type(err).__name__}: {err})"
            ) from err

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _predict(self, items: list[tuple[Any, np.ndarray]]) -> list[dict[str, Any]]:
        """Dynamic batch: one forward pass per model version for images from many concurrent
        requests; when it fails, each image alone, so only the request of a bad image gets
        its error."""
        from medcae.serving.versions import predict_grouped

        return await asyncio.to_thread(predict_grouped, items)

    async def _one(self, loaded: Any, image: np.ndarray, name: str = "image") -> dict[str, Any]:
        out = await self._predict((loaded, image))
        if isinstance(out, RequestError):
            raise RequestError(out.status, out.code, f"{name}: {out.detail}")
        return out

    def _answered(
        self, request: Request, route: str, served: Any, loaded: Any, preds: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Record the answer (stats window, metrics, answer log); the response's common part."""
        from medcae.serving import metrics

        rid = request.state.request_id
        served.note(loaded.version, preds)
        metrics.record_predictions(loaded.model_id, loaded.version, preds)
        if self.answers is not None:
            who = request.state.who
            self.answers.write(rid, who, route, loaded.model_id, loaded.version, preds)
        return {"model": loaded.model_id, "version": loaded.version, "request_id": rid}

    def _begin(self, request: Request, role: str = "predict") -> Any:
        """Key check (the key must hold ``role``), and the request's id and caller for the
        answer log; returns the key (:data:`LOCAL_USER` without keys)."""
        from medcae.serving.answers import request_id

        key = authorize(request.headers.get("authorization"), self.keys, role)
        # (not ``is LOCAL_USER``: Serve ships this class by value, with a copy of that object)
        request.state.who = f"key:{key.digest[:8]}" if key.digest else "anonymous"
        if not getattr(request.state, "request_id", None):  # set by RequestMetrics
            request.state.request_id = request_id(request.headers.get("x-request-id"))
        return key

    async def _predict_one(self, request: Request, name: str | None, version, alias) -> dict:
        self._begin(request)
        served = await self._served(name, version, alias)
        loaded = served.loaded  # accepted by this version: answered by it
        request.state.version = loaded.version
        (image,) = await read_images(request, self.limits, False, loaded.side)
        pred = await self._one(loaded, image)
        return self._answered(request, "predict", served, loaded, [pred]) | {"prediction": pred}

    async def _predict_many(self, request: Request, name: str | None, version, alias) -> dict:
        self._begin(request)
        served = await self._served(name, version, alias)
        loaded = served.loaded
        request.state.version = loaded.version
        images = await read_images(request, self.limits, True, loaded.side)
        preds = list(
            await asyncio.gather(
                *(self._one(loaded, im, f"images[{i}]") for i, im in enumerate(images))
            )
        )
        return self._answered(request, "predict/batch", served, loaded, preds) | {
            "predictions": preds
        }

    async def _explain_one(
        self, request: Request, name: str | None, version, alias, label: str | None
    ) -> dict[str, Any]:
        self._begin(request)
        served = await self._served(name, version, alias)
        loaded = served.loaded
        request.state.version = loaded.version
        (image,) = await read_images(request, self.limits, False, loaded.side)
        out = await asyncio.to_thread(self._explain, loaded, image, label)
        return self._answered(request, "explain", served, loaded, [out["prediction"]]) | out

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

    async def _info(self, request: Request, name: str | None, version, alias) -> dict:
        self._begin(request)
        served = await self._served(name, version, alias)
        loaded = served.loaded
        request.state.version = loaded.version
        info = model_info(loaded.predictor.meta, loaded.model_id)
        return info | {"version": loaded.version, "pid": os.getpid()}

    async def _card(self, request: Request, name: str | None, version, alias) -> Response:
        self._begin(request)
        served = await self._served(name, version, alias)
        request.state.version = served.loaded.version
        card = served.loaded.predictor.card
        return PlainTextResponse(card, media_type="text/markdown; charset=utf-8")

    @app.post(
        "/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY
    )
    async def predict(self, request: Request) -> dict[str, Any]:
        """Classify one PNG, JPEG or DICOM image (raw body or multipart ``file``) with the
        default model."""
        return await self._predict_one(request, None, None, None)

    @app.post(
        "/v1/predict/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY,
    )
    async def predict_batch(self, request: Request) -> dict[str, Any]:
        """Classify several images with the default model: multipart files, or JSON
        ``{"images": [base64, ...]}``."""
        return await self._predict_many(request, None, None, None)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses=ERRORS,
        openapi_extra=PREDICT_BODY,
    )
    async def explain(self, request: Request, label: str | None = None) -> dict[str, Any]:
        """Classify one image with the default model and show where the evidence lies: each
        code-map location's exact contribution to the class's score (``label``, default the
        predicted class), with a PNG of the map over the image as the model saw it."""
        return await self._explain_one(request, None, None, None, label)

    @app.get("/v1/model/card", response_class=PlainTextResponse, responses=ERRORS)
    async def model_card(self, request: Request) -> Response:
        """The default model's MODEL_CARD.md: data, intended use, metrics with intervals."""
        return await self._card(request, None, None, None)

    @app.get("/v1/model", responses=ERRORS)
    async def model(self, request: Request) -> dict[str, Any]:
        """The default model: backbone, tap, CAE shape, labels, metrics, creation time and
        versions."""
        return await self._info(request, None, None, None)

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS)
    async def models(self, request: Request) -> dict[str, Any]:
        """The models this server answers for: the default (the first), the version each
        serves on this replica, and every version and alias a registered one has."""
        self._begin(request)
        return {"default": self.specs[0].name, "models": await asyncio.to_thread(self._list)}

    def _list(self) -> list[dict[str, Any]]:
        from medcae.registry.models import Registry, bundle_digest

        registry = Registry(self.registry_uri) if self.registry_uri else None
        out = []
        for i, spec in enumerate(self.specs):
            if spec.registered and registry is not None:
                versions = [
                    {"version": v.version, "aliases": v.aliases, "metrics": v.metrics}
                    for v in registry.versions(spec.ref.name)
                ]
            else:
                if spec.name not in self._folder_versions:
                    self._folder_versions[spec.name] = bundle_digest(spec.ref.path)[:8]
                versions = [{"version": self._folder_versions[spec.name], "aliases": []}]
            out.append(
                {
                    "name": spec.name,
                    "default": i == 0,
                    "ref": str(spec.ref),
                    "registered": spec.registered,
                    "versions": versions,
                }
            )
        return out

    @app.get("/v1/models/{name}", responses=ERRORS)
    async def model_named(
        self, request: Request, name: str, version: str | None = None, alias: str | None = None
    ) -> dict[str, Any]:
        """One model (``?version=`` / ``?alias=`` another of its registered versions)."""
        return await self._info(request, name, version, alias)

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra=PREDICT_BODY,
    )
    async def predict_named(
        self, request: Request, name: str, version: str | None = None, alias: str | None = None
    ) -> dict[str, Any]:
        """Classify one image with the model ``name``."""
        return await self._predict_one(request, name, version, alias)

    @app.post(
        "/v1/models/{name}/predict/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        openapi_extra=BATCH_BODY,
    )
    async def predict_batch_named(
        self, request: Request, name: str, version: str | None = None, alias: str | None = None
    ) -> dict[str, Any]:
        """Classify several images with the model ``name``."""
        return await self._predict_many(request, name, version, alias)

    @app.post(
        "/v1/models/{name}/explain",
        response_model=ExplainResponse,
        responses=ERRORS,
        openapi_extra=PREDICT_BODY,
    )
    async def explain_named(
        self,
        request: Request,
        name: str,
        label: str | None = None,
        version: str | None = None,
        alias: str | None = None,
    ) -> dict[str, Any]:
        """Classify one image with the model ``name`` and show where the evidence lies."""
        return await self._explain_one(request, name, version, alias, label)

    @app.get("/v1/models/{name}/card", response_class=PlainTextResponse, responses=ERRORS)
    async def card_named(
        self, request: Request, name: str, version: str | None = None, alias: str | None = None
    ) -> Response:
        """The model card of the model ``name``."""
        return await self._card(request, name, version, alias)

    @app.get("/v1/models/{name}/stats", response_model=StatsResponse, responses=ERRORS)
    async def stats_named(self, request: Request, name: str) -> dict[str, Any]:
        """The last answers of the model ``name`` on the replica that answers: the share out
        of distribution and the mix of predicted labels, next to the label mix of the
        validation split in the bundle; each flagged outside its band (docs/models.md)."""
        self._begin(request)
        served = await self._served(name)
        request.state.version = served.loaded.version
        return served.stats() | {"replica_pid": os.getpid()}

    # ------------------------------------------------------------------ the labeling loop

    def _make_loops(self, pools, state_dir, jobs_address, train_args, data_dir) -> dict:
        """One :class:`medcae.labeling.service.Loop` per model with a pool."""
        import shlex

        from medcae.labeling.service import Loop
        from medcae.serving.catalog import find, parse_pools

        if isinstance(train_args, str):
            train_args = shlex.split(train_args)
        runner = None
        if jobs_address:
            from medcae.distributed.jobs import RayJobs

            runner = RayJobs(jobs_address)
        loops = {}
        for name, source in parse_pools(pools, self.specs).items():
            spec = find(self.specs, name)
            loops[name] = Loop(
                name,
                spec.ref.name if spec.registered else None,
                source,
                state_dir or "state",
                self.registry_uri,
                runner,
                list(train_args or ()),
                data_dir,
            )
        return loops

    async def _labeling(self, request: Request, name: str, role: str) -> tuple[Any, Any, Any]:
        """The caller's key (holding ``role``), the model's loop and the version it serves."""
        from medcae.labeling.service import Model

        key = self._begin(request, role)
        loop = self.loops.get(name)
        if loop is None:
            raise RequestError(
                404,
                "no_pool",
                f"model {name!r} has no labeling pool (serve it with --pool {name}=PATH)"
                if any(s.name == name for s in self.specs)
                else f"no model {name!r}",
            )
        served = await self._served(name)
        loaded = served.loaded
        request.state.version = loaded.version
        return key, loop, Model.of(loaded.predictor, loaded.version)

    def _warm(self, name: str, served: Any) -> None:
        """Predict the pool of ``name`` through the version ``served`` has, in a thread (the
        first queue request then waits for it, not for a second pass)."""
        import threading

        from medcae.labeling.service import Model

        if served is None or name not in self.loops:
            return
        m = Model.of(served.loaded.predictor, served.loaded.version)

        def run() -> None:
            try:
                self.loops[name].predictions(m)
            except Exception:  # noqa: BLE001 - the first request tries again and reports it
                log.exception("predicting the pool of %s failed", name)

        threading.Thread(target=run, name=f"medcae-pool-{name}", daemon=True).start()

    @staticmethod
    async def _call(fn: Any, *args: Any) -> Any:
        """Run a loop method in a thread; its refusals become 4xx/503 answers."""
        from medcae.labeling.service import LoopError

        try:
            return await asyncio.to_thread(fn, *args)
        except LoopError as err:
            raise RequestError(err.status, err.code, err.detail) from err

    async def _json_body(self, request: Request, fields: dict[str, type]) -> dict[str, Any]:
        """A small JSON object body with the ``fields`` of the given types."""
        import json

        from medcae.serving.http import read_body

        body = await read_body(request, 64 * 1024, self.limits.body_timeout_s)
        try:
            data = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, "bad_json", f"the body is not JSON ({err})") from err
        if not isinstance(data, dict):
            raise RequestError(422, "bad_body", f"expected a JSON object with {sorted(fields)}")
        for field, kind in fields.items():
            if not isinstance(data.get(field), kind):
                raise RequestError(
                    422,
                    "bad_body",
                    f"{field}: expected {kind.__name__}, got {type(data.get(field)).__name__}",
                )
        return data

    @app.get("/v1/whoami", responses=ERRORS)
    async def whoami(self, request: Request) -> dict[str, Any]:
        """The caller's key name and role, and the models that have a labeling pool."""
        key = self._begin(request, "predict")
        return {"name": key.name, "role": key.role, "labeling": sorted(self.loops)}

    @app.get("/v1/models/{name}/queue", responses=ERRORS)
    async def queue(
        self, request: Request, name: str, k: int = 5, strategy: str = "hybrid"
    ) -> dict[str, Any]:
        """The next ``k`` images to label (role ``label``), ranked by ``strategy`` (as
        ``medcae suggest``), each leased to the caller for 10 minutes; labeled and
        out-of-distribution images left out."""
        key, loop, m = await self._labeling(request, name, "label")
        images = await self._call(loop.queue, m, k, key.name, strategy)
        progress = await self._call(loop.progress, m)
        return {"model": name, "version": m.version, "images": images, "progress": progress}

    @app.get("/v1/models/{name}/progress", responses=ERRORS)
    async def progress(self, request: Request, name: str) -> dict[str, Any]:
        """Labels per class, how many images are labeled and how many are left (``label``)."""
        _, loop, m = await self._labeling(request, name, "label")
        return {"model": name, "version": m.version} | await self._call(loop.progress, m)

    @app.get("/v1/models/{name}/pool/{image_id}", responses=ERRORS, response_class=Response)
    async def pool_image(self, request: Request, name: str, image_id: str) -> Response:
        """One pool image as the model sees it, PNG (``label``); only ids of the pool."""
        _, loop, m = await self._labeling(request, name, "label")
        png = await self._call(loop.image_png, image_id, m.side)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/v1/models/{name}/labels", responses=ERRORS, status_code=201)
    async def add_label(self, request: Request, name: str) -> dict[str, Any]:
        """Keep a label (``label``): ``{"image_id": ..., "label": "class"}`` (findings:
        ``"A|B"`` or ``"No Finding"``; ``""`` undoes). 201 once it is on disk."""
        key, loop, m = await self._labeling(request, name, "label")
        body = await self._json_body(request, {"image_id": str, "label": str})
        return await self._call(loop.add_label, m, body["image_id"], body["label"], key.name)

    @app.post("/v1/models/{name}/skip", responses=ERRORS)
    async def skip(self, request: Request, name: str) -> dict[str, Any]:
        """Give an image's lease back (``label``): ``{"image_id": ...}``."""
        key, loop, _ = await self._labeling(request, name, "label")
        body = await self._json_body(request, {"image_id": str})
        await self._call(loop.skip, body["image_id"], key.name)
        return {"image_id": body["image_id"], "skipped": True}

    @app.get("/v1/models/{name}/labels", responses=ERRORS, response_class=PlainTextResponse)
    async def export_labels(self, request: Request, name: str) -> Response:
        """The current labels as the CSV ``medcae run`` reads (``label``)."""
        _, loop, _ = await self._labeling(request, name, "label")
        text = await self._call(loop.export_csv)
        return PlainTextResponse(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}-labels.csv"'},
        )

    @app.post("/v1/models/{name}/train", responses=ERRORS | {409: {"model": ErrorResponse}})
    async def train(self, request: Request, name: str) -> JSONResponse:
        """Retrain on the labels so far (``admin``), as a Ray job on the server's cluster;
        202 with the job, 409 naming the job already running."""
        key, loop, _ = await self._labeling(request, name, "admin")
        job = await self._call(loop.train, key.name)
        return JSONResponse(job, status_code=202)

    @app.get("/v1/models/{name}/jobs", responses=ERRORS)
    async def jobs(self, request: Request, name: str) -> dict[str, Any]:
        """The model's retraining jobs, newest first (``admin``)."""
        _, loop, _ = await self._labeling(request, name, "admin")
        return {"model": name, "jobs": await self._call(loop.jobs)}

    @app.get("/v1/jobs/{job_id}", responses=ERRORS)
    async def job(self, request: Request, job_id: str) -> dict[str, Any]:
        """A retraining job (``admin``): state, progress line, why it failed, its version."""
        self._begin(request, "admin")
        for loop in self.loops.values():
            row = await asyncio.to_thread(loop.store.job, job_id)
            if row is not None and row["model"] == loop.model:
                return await self._call(loop.job, job_id)
        raise RequestError(404, "unknown_job", f"no job {job_id[:80]!r}")

    @app.get("/v1/models/{name}/compare", responses=ERRORS)
    async def compare(self, request: Request, name: str) -> dict[str, Any]:
        """The challenger against the champion on the same held-out images (``admin``)."""
        _, loop, _ = await self._labeling(request, name, "admin")
        return await self._call(loop.compare)

    @app.post("/v1/models/{name}/promote", responses=ERRORS)
    async def promote(self, request: Request, name: str) -> dict[str, Any]:
        """Make a version the champion (``admin``): ``{"version": "3"}``. This replica
        serves it before answering; the others within the follow interval."""
        key, loop, _ = await self._labeling(request, name, "admin")
        body = await self._json_body(request, {"version": str})
        out = await self._call(loop.promote, body["version"], key.name)
        served = await self._served(name)
        follower = getattr(served, "follower", None)
        if follower is not None:
            await asyncio.to_thread(follower.poll)
        self._warm(name, served)  # the queue, ranked by the new champion
        return out | {"serving": served.loaded.version}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The try-the-model page (no external assets; its API calls carry the key)."""
        return HTMLResponse(PAGE_HTML, headers=PAGE_HEADERS)

    @app.get("/static/page.js", include_in_schema=False)
    async def page_js(self) -> Response:
        """The page's script."""
        return Response(PAGE_JS, media_type="text/javascript", headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica is up and its default model loads."""
        served = await self._served(None)
        return {"status": "ok", "model": served.name, "version": served.loaded.version}


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run medcae.serving.app:build_app bundle=...`` and config
    files."""
    if not any(args.get(k) for k in ("bundle", "model", "models")):
        raise ValueError(
            "serve app needs the argument 'bundle' (a bundle folder) or 'models' (a list of "
            "bundle folders and NAME, NAME@ALIAS or NAME/VERSION, with 'registry_uri')"
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
            "models",
            "registry_uri",
            "follow_s",
            "models_per_replica",
            "log_dir",
            "stats_window",
            "pools",
            "state_dir",
            "jobs_address",
            "train_args",
            "data_dir",
        )
        if k in args
    }
    if isinstance(kwargs.get("api_key_sha256"), str):  # `serve run ... api_key_sha256=a,b`
        kwargs["api_key_sha256"] = kwargs["api_key_sha256"].split(",")
    for key in ("max_batch_size", "threads", "models_per_replica", "stats_window"):
        if key in kwargs:
            kwargs[key] = int(kwargs[key])
    if "num_replicas" not in args:  # a Serve config's deployment settings (autoscaling) rule
        return MedcaeModel.bind(**kwargs)
    replicas = int(args["num_replicas"])
    if replicas < 1:
        raise ValueError(f"num_replicas {replicas}: expected at least 1")
    queued = int(args.get("max_queued_requests", 256))  # beyond: 503 at once, not a pile-up
    return MedcaeModel.options(num_replicas=replicas, max_queued_requests=queued).bind(**kwargs)
