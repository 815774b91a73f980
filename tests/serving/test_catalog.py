"""The served models' names, the stats window's flags, the answer log and the metric labels
(Ray-free: the routes through a real server are in tests/registry/test_serve_models.py)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from medcae.config import ConfigError
from medcae.serving import metrics
from medcae.serving.answers import AnswerLog, request_id
from medcae.serving.api import RequestError
from medcae.serving.auth import check_bearer, hash_key
from medcae.serving.catalog import MIN_STATS, Served, build_specs, drift_band, find, variant


def test_names_labels_and_the_default(demo_bundle, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(demo_bundle.path, other)
    specs = build_specs(["chest@champion", f"breast={other}", "knee/3", str(demo_bundle.path)])
    assert [s.name for s in specs][:3] == ["chest", "breast", "knee"]
    assert specs[3].name.startswith("medcae-demo-")  # a folder answers as its content id
    assert [s.registered for s in specs] == [True, False, True, False]
    assert str(specs[0].ref) == "chest@champion" and specs[2].ref.version == "3"
    with pytest.raises(ConfigError, match=r"two models are named 'chest'.*LABEL="):
        build_specs(["chest", "chest@challenger"])
    with pytest.raises(ConfigError, match="bundle.json"):
        build_specs([str(tmp_path)])  # a folder that is no bundle
    with pytest.raises(ConfigError, match="no model to serve"):
        build_specs([])


def test_unknown_models_versions_and_aliases_are_404s_naming_what_exists(demo_bundle):
    specs = build_specs(["chest", f"breast={demo_bundle.path}"])
    with pytest.raises(RequestError) as err:
        find(specs, "lung")
    assert err.value.status == 404 and "serves chest, breast" in err.value.detail
    assert variant(specs[0], "2", None) == ("chest/2", specs[0].ref.__class__("chest", None, "2"))
    assert variant(specs[0], None, "challenger")[0] == "chest@challenger"
    assert variant(specs[0], None, None) == ("chest", specs[0].ref)
    for version, alias, message in (
        ("2", "x", "not both"),
        ("two", None, "not a number"),
        (None, "../etc", "not an alias"),
    ):
        with pytest.raises(RequestError, match=message) as err:
            variant(specs[0], version, alias)
        assert err.value.status == 404
    with pytest.raises(RequestError, match="bundle folder with one version") as err:
        variant(specs[1], "2", None)


def _served(meta: dict, window: int = 200) -> Served:
    loaded = SimpleNamespace(predictor=SimpleNamespace(meta=meta), version="1")
    return Served("chest", "chest", loaded, window)


META = {
    "label_names": ["normal", "pneumonia"],
    "data_summary": {"counts": {"val": {"normal": 25, "pneumonia": 75}}},
    "ood": {"quantile": 0.99},
}


def _answers(n: int, pneumonia: float, ood: float) -> list[dict]:
    out = []
    for i in range(n):
        label = "pneumonia" if i < round(n * pneumonia) else "normal"
        out.append({"label": label, "in_distribution": i >= round(n * ood)})
    return out


def test_stats_flag_a_label_mix_or_ood_rate_outside_the_band_and_not_within_it():
    steady = _served(META)
    steady.note("1", _answers(200, 0.72, 0.01))
    s = steady.stats()
    assert s["answers"] == 200 and s["enough_answers"] and not s["flagged"]
    assert s["labels"]["pneumonia"]["expected"] == 0.75
    assert s["labels"]["pneumonia"]["observed"] == 0.72
    shifted = _served(META)
    shifted.note("1", _answers(200, 0.30, 0.20))  # a new site: other patients, other images
    s = shifted.stats()
    assert s["flagged"] and s["labels"]["pneumonia"]["flagged"] and s["ood"]["flagged"]
    assert s["ood"]["observed"] == 0.2 and s["ood"]["expected"] == pytest.approx(0.01)
    few = _served(META)
    few.note("1", _answers(MIN_STATS - 1, 0.0, 1.0))
    assert not few.stats()["flagged"] and not few.stats()["enough_answers"]
    window = _served(META, window=50)
    window.note("1", _answers(40, 0.0, 0.0))
    window.note("2", _answers(30, 0.75, 0.0))
    s = window.stats()
    assert s["answers"] == 50 and s["versions_in_window"] == ["1", "2"]
    assert drift_band(0.5, 100, 0.1) == pytest.approx(0.25)


def test_answer_log_one_json_line_per_image_rotated_by_size(tmp_path):
    log = AnswerLog(tmp_path / "logs", max_bytes=2000, backups=2)
    preds = [
        {
            "label": "ring",
            "probabilities": {"ring": 0.9, "normal": 0.1},
            "in_distribution": True,
            "reconstruction_error": 0.25,
        }
    ] * 2
    for i in range(30):
        log.write(f"r{i}", "key:0123abcd", "predict/batch", "chest", "3", preds)
    log.close()
    files = sorted((tmp_path / "logs").iterdir())
    assert [f.name for f in files] == [log.path.name, log.path.name + ".1", log.path.name + ".2"]
    assert all(f.stat().st_size <= 2000 for f in files)
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    last = lines[-1]
    assert last["request_id"] == "r29" and last["index"] == 1 and last["key"] == "key:0123abcd"
    assert set(last) == {
        "time",
        "request_id",
        "key",
        "route",
        "model",
        "version",
        "label",
        "probabilities",
        "in_distribution",
        "reconstruction_error",
        "index",
    }


def test_request_ids_and_who_asked():
    assert request_id("abc-123") == "abc-123"
    for hostile in ("", "a" * 65, "x\r\nSet-Cookie: 1", "../../"):
        rid = request_id(hostile)
        assert rid != hostile and len(rid) == 32  # a fresh one
    digest = hash_key("secret")
    assert check_bearer("Bearer secret", (hash_key("other"), digest)) == f"key:{digest[:8]}"
    assert check_bearer(None, ()) == "anonymous"


def test_metric_labels_come_from_the_servers_own_names():
    metrics.configure(["chest", "breast"])
    assert metrics.classify("/v1/predict") == ("chest", "predict")
    assert metrics.classify("/v1/models/breast/predict/batch") == ("breast", "predict/batch")
    assert metrics.classify("/v1/models/breast/stats") == ("breast", "stats")
    assert metrics.classify("/v1/models/<script>/predict") == ("unknown", "predict")
    assert metrics.classify("/v1/models/breast/../../x") == ("breast", "other")
    assert metrics.classify("/v1/model/card") == ("chest", "card")
    assert metrics.classify("/healthz") is None and metrics.classify("/") is None
