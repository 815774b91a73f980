"""Host checks, CORS only when configured, and one bad image inside a dynamic batch."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from medcae.config import ConfigError
from medcae.serving.api import Limits, RequestError, check_batch_size, predict_each
from medcae.serving.auth import allowed_hosts_for, host_allowed, parse_hosts


@pytest.mark.parametrize(
    ("header", "allowed", "ok"),
    [
        ("127.0.0.1:8000", ("127.0.0.1",), True),
        ("localhost", ("localhost",), True),
        ("LOCALHOST.:8000", ("localhost",), True),
        ("[::1]:8000", ("::1",), True),
        ("evil.example:8000", ("localhost", "127.0.0.1"), False),
        ("127.0.0.1.evil.example", ("127.0.0.1",), False),
        ("api.models.example.org", ("*.example.org",), True),
        ("example.org.attacker.net", ("*.example.org",), False),
        ("", ("localhost",), False),
        (None, ("localhost",), False),
        ("a b", ("localhost",), False),
        ("anything", ("*",), True),
    ],
)
def test_host_header_check(header, allowed, ok):
    assert host_allowed(header, allowed) is ok


def test_allowed_hosts_defaults_and_errors():
    assert allowed_hosts_for("127.0.0.1", environ={}) == ("localhost", "127.0.0.1", "::1")
    assert "10.0.0.5" in allowed_hosts_for("10.0.0.5", environ={})
    assert allowed_hosts_for("0.0.0.0", "models.example.org", environ={}) == ("models.example.org",)
    env = {"MEDCAE_ALLOWED_HOSTS": "a.example, b.example"}
    assert allowed_hosts_for("0.0.0.0", environ=env) == ("a.example", "b.example")
    with pytest.raises(ConfigError, match="--allowed-hosts"):
        allowed_hosts_for("0.0.0.0", environ={})
    with pytest.raises(ConfigError, match="not a host name"):
        parse_hosts("good.example, bad/host")


def _asgi_app(hosts, cors):
    """The Serve app's own guard around a minimal FastAPI app (no Ray needed)."""
    from fastapi import FastAPI

    from medcae.serving.middleware import Guard, configure_guard

    configure_guard(hosts, cors)
    inner = FastAPI()
    inner.add_middleware(Guard)

    @inner.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @inner.get("/v1/model")
    async def model():
        return {"id": "m"}

    return inner


def _get(app, path, headers):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            return await c.request(
                "OPTIONS" if "access-control-request-method" in headers else "GET",
                path,
                headers=headers,
            )

    return asyncio.run(go())


def test_guard_refuses_other_hosts_but_not_the_health_check():
    app = _asgi_app(("localhost", "127.0.0.1"), ())
    r = _get(app, "/v1/model", {"host": "rebind.attacker.example"})
    assert r.status_code == 400 and r.json()["error"] == "bad_host"
    assert _get(app, "/v1/model", {"host": "127.0.0.1:8000"}).json() == {"id": "m"}
    assert _get(app, "/healthz", {"host": "10.1.2.3:8000"}).status_code == 200


def test_no_cors_headers_unless_configured():
    origin = {"host": "localhost", "origin": "https://app.example.org"}
    r = _get(_asgi_app(("localhost",), ()), "/v1/model", origin)
    assert "access-control-allow-origin" not in r.headers
    app = _asgi_app(("localhost",), ("https://app.example.org",))
    r = _get(app, "/v1/model", origin)
    assert r.headers["access-control-allow-origin"] == "https://app.example.org"
    r = _get(app, "/v1/model", origin | {"origin": "https://other.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = _get(app, "/v1/model", origin | {"access-control-request-method": "POST"})
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]


def test_one_bad_image_in_a_batch_fails_alone(demo_bundle):
    from medcae.inference.predictor import Predictor

    predictor = Predictor.from_bundle(demo_bundle.path, runtime="torch")
    good = list(demo_bundle.test_images[:3])
    bad = np.zeros((8, 8, 2), np.uint8)  # no decoder yields it; the model raises ValueError
    out = predict_each(predictor.predict, [good[0], bad, good[1], good[2]])
    assert isinstance(out[1], RequestError) and (out[1].status, out[1].code) == (
        422,
        "unprocessable_image",
    )
    alone = [vars(p) for p in predictor.predict(good)]
    for got, want in zip([out[0], out[2], out[3]], alone):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert predict_each(predictor.predict, good) == alone  # a good batch: one pass, same


def test_models_on_one_backbone_share_its_pass_and_a_bad_image_still_fails_alone(demo_bundle):
    """A dynamic batch mixing two models (here: one bundle loaded twice, as two names) and
    another backbone runs one backbone pass per backbone, and each image gets its own model's
    answer; a bad image in the mix fails alone."""
    from dataclasses import replace

    from medcae.inference.predictor import Predictor
    from medcae.serving.versions import Loaded, backbone_key, predict_grouped

    def loaded(name: str, runtime: str) -> Loaded:
        p = Predictor.from_bundle(demo_bundle.path, runtime=runtime)
        return Loaded(p, name, "1", 64, backbone_key(p.meta, runtime))

    a, b, c = loaded("a", "torch"), loaded("b", "torch"), loaded("c", "onnxruntime")
    passes = []
    for m in (a, b, c):
        real = m.predictor.backbone
        m.predictor.backbone = lambda images, real=real: passes.append(len(images)) or real(images)
    assert a.backbone_key == b.backbone_key != c.backbone_key
    good = list(demo_bundle.test_images[:4])
    bad = np.zeros((8, 8, 2), np.uint8)
    out = predict_grouped([(a, good[0]), (b, good[1]), (c, good[2]), (a, good[3]), (b, good[1])])
    assert passes == [4, 1]  # one pass for the four images of a and b, one for c's
    want = [vars(p) for p in a.predictor.predict(good)]
    for i, j in enumerate((0, 1, 2, 3, 1)):
        assert out[i]["probabilities"] == pytest.approx(want[j]["probabilities"], abs=1e-4)
    out = predict_grouped([(a, good[0]), (b, bad), (b, good[1])])
    assert isinstance(out[1], RequestError) and out[1].code == "unprocessable_image"
    assert out[2]["probabilities"] == pytest.approx(want[1]["probabilities"], abs=1e-4)
    other = replace(b, predictor=Predictor.from_bundle(demo_bundle.path, runtime="torch"))
    head = other.predictor.head
    other.predictor.head = replace(head, coef=head.coef[::-1].copy())  # another head
    mixed = predict_grouped([(a, good[0]), (other, good[0])])
    assert mixed[0]["probabilities"] != mixed[1]["probabilities"]  # each its own head


def test_the_default_batch_limit_is_32_images():
    limits = Limits()
    check_batch_size(32, limits)  # at the limit: accepted
    with pytest.raises(RequestError, match="33 images is over the batch limit of 32") as err:
        check_batch_size(33, limits)
    assert err.value.status == 413
    with pytest.raises(RequestError) as empty:
        check_batch_size(0, limits)
    assert empty.value.status == 400
