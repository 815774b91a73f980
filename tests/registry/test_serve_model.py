"""`medcae serve --model NAME@ALIAS`: a registered version served as a user starts it."""

from __future__ import annotations

import os
import sys

import httpx
import pytest
from helpers import ROOT, medcae_subprocess, png_bytes, serve_reaped

from medcae.registry.models import Registry

pytestmark = pytest.mark.serve


def test_serve_model_at_an_alias_answers_as_that_version(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = Registry(uri)
    registry.register("chest", demo_bundle.path)
    registry.register("chest", demo_bundle.path)
    registry.promote("chest", "1")  # the older one is in production
    image = png_bytes(demo_bundle.test_images[0])

    def during(base: str) -> dict:
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/v1/model").json()
            answer = client.post("/v1/predict", content=image).json()
            return {"info": info, "answer": answer}

    env = {**os.environ, "MEDCAE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "chest@champion", "--mlflow", uri]
    got = serve_reaped(cmd, tmp_path, ROOT, env, during)
    assert (got["info"]["id"], got["info"]["version"]) == ("chest", "1")
    assert (got["answer"]["model"], got["answer"]["version"]) == ("chest", "1")
    assert got["answer"]["prediction"]["label"] in got["info"]["label_names"]


def test_serve_an_unknown_model_fails_before_ray_naming_what_exists(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    Registry(uri).register("chest", demo_bundle.path)
    out = medcae_subprocess("serve", "--model", "lung@champion", "--mlflow", uri)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no model 'lung'") and "holds chest" in last, last
