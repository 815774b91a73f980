"""The baseline a user would otherwise write: one FastAPI + uvicorn process, same Predictor.

    python -m medcae.serving.baseline --bundle runs/demo/bundle --port 8001

Same validation and response schema as the Ray Serve app, no batching, no replicas.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from medcae.serving.api import Limits, RequestError, model_id


def make_app(bundle: str, runtime: str = "auto") -> FastAPI:
    """A single-process FastAPI app serving ``bundle`` through ``Predictor``."""
    from medcae.inference.predictor import Predictor
    from medcae.serving.http import read_images

    predictor = Predictor.from_bundle(bundle, runtime=runtime)
    ident, limits = model_id(predictor.meta), Limits()
    side = predictor.extractor.cfg.resolution
    app = FastAPI(title="medcae baseline")

    @app.exception_handler(RequestError)
    async def _err(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        (image,) = await read_images(request, limits, False, side)
        (pred,) = await asyncio.to_thread(predictor.predict, [image])
        return {"model": ident, "prediction": pred.__dict__}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model": ident}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument(
        "--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"]
    )
    a = p.parse_args()
    uvicorn.run(make_app(a.bundle, a.runtime), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
