import json
import os

import numpy as np
import pytest
import torch

from medcae.bundle import BundleError, read_bundle, write_bundle
from medcae.config import BackboneConfig, CAEConfig, ClassifierConfig, PipelineConfig
from medcae.data import load_dataset
from medcae.engine import build_cae, channel_stats, embed_all
from medcae.evaluation import fit_and_test
from medcae.features import FeatureExtractor
from medcae.predictor import Predictor


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, demo_npz):
    """A real bundle built with the core only: real backbone, untrained tiny CAE, fitted head."""
    cfg = PipelineConfig(
        backbone=BackboneConfig(taps=("stage4",), resolution=64),
        cae=CAEConfig(channels=(16,), latent_channels=8),
        classifier=ClassifierConfig(C_grid=(1.0,)),
    )
    ds = load_dataset(str(demo_npz))
    ext = FeatureExtractor(cfg.backbone)
    parts = {s: ds.splits[s] for s in ("train", "val", "test")}
    maps = {s: ext(p.images[:60])["maps"] for s, p in parts.items()}
    labels = {s: p.labels[:60] for s, p in parts.items()}
    cae = build_cae(maps["train"].shape[1], cfg.cae, *channel_stats(maps["train"]))
    codes = {s: embed_all(cae, m) for s, m in maps.items()}
    ev = fit_and_test(cfg.classifier, codes, labels, ds.label_names)
    meta = {
        "config": cfg.to_dict(),
        "label_names": ds.label_names,
        "in_channels": int(maps["train"].shape[1]),
        "ood": {"threshold": 1.0},
    }
    path = write_bundle(
        tmp_path_factory.mktemp("b") / "bundle", meta, cae.state_dict(), ev.head.to_arrays()
    )
    expected = ev.head.predict_proba(codes["test"])
    return path, parts["test"].images[:60], expected


def test_bundle_round_trip_gives_identical_predictions(tiny_bundle):
    path, images, expected = tiny_bundle
    got = Predictor.from_bundle(path).predict_proba(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_predictor_takes_encoded_bytes(tiny_bundle):
    import io

    from PIL import Image

    path, images, expected = tiny_bundle
    blobs = []
    for im in images[:4]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    pred = Predictor.from_bundle(path)
    np.testing.assert_allclose(pred.predict_proba(blobs), expected[:4], atol=1e-6)
    out = pred.predict(blobs[:1])[0]
    assert out.label in pred.label_names and abs(sum(out.probabilities.values()) - 1) < 1e-9


def test_bundle_files_and_metadata(tiny_bundle):
    path, _, _ = tiny_bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert {"config", "label_names", "versions", "created", "files", "format_version"} <= set(meta)
    assert sorted(p.name for p in path.iterdir()) == ["bundle.json", "cae.pt", "classifier.npz"]


def test_tampered_or_incomplete_bundles_do_not_load(tiny_bundle, tmp_path):
    import shutil

    path, _, _ = tiny_bundle
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    with open(bad / "cae.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(bad)
    os.remove(bad / "bundle.json")
    with pytest.raises(BundleError, match="bundle.json"):
        read_bundle(bad)


def test_pickled_objects_are_refused(tiny_bundle, tmp_path):
    """A cae.pt holding a pickled object (not tensors) fails weights_only loading."""
    import hashlib
    import shutil

    path, _, _ = tiny_bundle
    evil = tmp_path / "evil"
    shutil.copytree(path, evil)
    torch.save({"x": object()}, evil / "cae.pt")
    meta = json.loads((evil / "bundle.json").read_text())
    meta["files"]["cae.pt"] = hashlib.sha256((evil / "cae.pt").read_bytes()).hexdigest()
    (evil / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        read_bundle(evil)


def test_crash_mid_write_keeps_the_old_bundle(tiny_bundle, tmp_path):
    import shutil

    path, _, _ = tiny_bundle
    dest = tmp_path / "bundle"
    shutil.copytree(path, dest)
    before = (dest / "bundle.json").read_text()
    meta, state, arrays = read_bundle(dest)
    arrays["bad"] = np.array([object()], dtype=object)  # np.savez refuses nothing, load would
    with pytest.raises(TypeError):
        write_bundle(dest, {**meta, "x": object()}, state, arrays)  # json fails after tensors
    assert (dest / "bundle.json").read_text() == before
    read_bundle(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left
