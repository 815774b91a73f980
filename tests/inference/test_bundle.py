import json
import os

import numpy as np
import pytest
import torch
from helpers import png_bytes

from medcae.inference.bundle import BundleError, read_bundle, write_bundle
from medcae.inference.predictor import Predictor


@pytest.fixture(scope="module")
def tiny_bundle(demo_bundle):
    return demo_bundle.path, demo_bundle.test_images, demo_bundle.expected_proba


def test_bundle_round_trip_gives_identical_predictions(tiny_bundle):
    path, images, expected = tiny_bundle
    got = Predictor.from_bundle(path).predict_proba(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_predictor_takes_encoded_bytes(tiny_bundle):
    path, images, expected = tiny_bundle
    blobs = [png_bytes(im) for im in images[:4]]
    pred = Predictor.from_bundle(path)
    np.testing.assert_allclose(pred.predict_proba(blobs), expected[:4], atol=1e-6)
    out = pred.predict(blobs[:1])[0]
    assert out.label in pred.label_names and abs(sum(out.probabilities.values()) - 1) < 1e-9


def test_bundle_files_and_metadata(tiny_bundle):
    path, _, _ = tiny_bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert {"config", "label_names", "versions", "created", "files", "format_version"} <= set(meta)
    assert sorted(p.name for p in path.iterdir()) == [
        "MODEL_CARD.md",
        "bundle.json",
        "cae.pt",
        "classifier.npz",
        "reliability.png",
    ]
    assert sorted(meta["files"]) == ["MODEL_CARD.md", "cae.pt", "classifier.npz", "reliability.png"]
    assert (path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_bundle_holds_exactly_its_listed_files(tiny_bundle, tmp_path):
    import shutil

    path, _, _ = tiny_bundle
    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    (extra / "cae.pt.orig").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"does not list: \['cae.pt.orig'\]"):
        read_bundle(extra)
    listed = tmp_path / "listed"
    shutil.copytree(path, listed)
    meta = json.loads((listed / "bundle.json").read_text())
    meta["files"]["../../etc/passwd"] = "0" * 64
    (listed / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"files .*passwd.*expected exactly"):
        read_bundle(listed)
    (listed / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(listed)


def test_other_backbone_weights_are_refused_naming_both_hashes(tiny_bundle, tmp_path):
    import shutil

    from medcae.model.backbones import weights_sha256

    path, _, _ = tiny_bundle
    moved = tmp_path / "moved"
    shutil.copytree(path, moved)
    meta = json.loads((moved / "bundle.json").read_text())
    trained = meta["preprocessing"]["weights_sha256"]
    meta["preprocessing"]["weights_sha256"] = "f" * 64  # as if trained with other weights
    (moved / "bundle.json").write_text(json.dumps(meta))
    here = weights_sha256(meta["config"]["backbone"]["name"], meta["config"]["backbone"]["weights"])
    assert here == trained
    with pytest.raises(BundleError, match=f"sha256 {here}.*trained with \\(sha256 {'f' * 64}"):
        Predictor.from_bundle(moved)


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


def test_bytes_and_arrays_take_the_same_path_at_any_size(demo_bundle):
    """Images smaller and larger than the backbone resolution, as arrays and as PNG bytes,
    alone and mixed in one call, give the same probabilities (no preprocessing drift)."""
    from PIL import Image

    pred = Predictor.from_bundle(demo_bundle.path)
    base = demo_bundle.test_images[:4]
    small = np.stack([np.asarray(Image.fromarray(a).resize((28, 28))) for a in base])
    large = np.stack([np.asarray(Image.fromarray(a).resize((150, 150))) for a in base])

    for arr in (small, large):
        np.testing.assert_allclose(
            pred.predict_proba([png_bytes(a) for a in arr]), pred.predict_proba(arr), atol=1e-5
        )
    mixed = pred.predict_proba([small[0], png_bytes(large[1]), small[2]])
    np.testing.assert_allclose(mixed[0], pred.predict_proba(small[:1])[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], pred.predict_proba(large[1:2])[0], atol=1e-5)


def test_each_file_is_read_once_and_loaded_from_the_bytes_hashed(tiny_bundle, tmp_path):
    """No second read between the hash check and the load (a file swapped in between would be
    loaded unverified): every file of the bundle is opened exactly once."""
    import shutil
    import sys
    from collections import Counter
    from pathlib import Path

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], bundle)
    opened: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # process-wide and permanent: it records only while watching
    watching[0] = True
    try:
        read_bundle(bundle)
    finally:
        watching[0] = False
    reads = Counter(Path(p).name for p in opened if Path(p).parent == bundle)
    assert set(reads) == {p.name for p in bundle.iterdir()}, reads
    assert set(reads.values()) == {1}, reads


def _format2_copy(src, dest):
    """``src`` as a bundle of the format before calibration and operating points: no
    ``calibration``/``operating_point``, an uncalibrated head, no figure, its own card."""
    import hashlib
    import shutil

    dest.mkdir()
    meta = json.loads((src / "bundle.json").read_text())
    for key in ("calibration", "operating_point"):
        meta.pop(key)
    shutil.copy(src / "cae.pt", dest / "cae.pt")
    with np.load(src / "classifier.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "shrink"}
    arrays["platt"] = np.tile([1.0, 0.0], (len(arrays["coef"]), 1))
    np.savez(dest / "classifier.npz", **arrays)
    (dest / "MODEL_CARD.md").write_text("# An old card\n")
    names = ("cae.pt", "classifier.npz", "MODEL_CARD.md")
    meta["files"] = {f: hashlib.sha256((dest / f).read_bytes()).hexdigest() for f in names}
    meta["format_version"] = 2
    (dest / "bundle.json").write_text(json.dumps(meta))
    return arrays


def test_a_bundle_from_before_calibration_predicts_by_argmax_and_its_card_says_so(
    tiny_bundle, tmp_path
):
    from medcae.inference.card import UNCALIBRATED
    from medcae.model.classifier import LinearHead

    path, images, _ = tiny_bundle
    arrays = _format2_copy(path, tmp_path / "old")
    old = Predictor.from_bundle(tmp_path / "old")
    raw = LinearHead.from_arrays("logreg", len(old.label_names), arrays)
    out = old.predict_arrays(images[:20])
    np.testing.assert_allclose(out["proba"], raw.predict_proba(out["features"]), atol=1e-12)
    preds = old.predictions(out)
    assert [p.label for p in preds] == [old.label_names[i] for i in out["proba"].argmax(1)]
    assert all(p.threshold is None for p in preds)
    assert old.card.startswith("# An old card") and UNCALIBRATED in old.card
    assert UNCALIBRATED not in Predictor.from_bundle(path).card


def test_predictor_labels_follow_the_bundles_threshold(tiny_bundle):
    from medcae.model.classifier import LinearHead

    path, images, _ = tiny_bundle
    p = Predictor.from_bundle(path)
    features = p.predict_arrays(images[:40])["features"]
    d = features.shape[1]
    rng = np.random.default_rng(0)
    head = LinearHead(
        "logreg",
        np.zeros(d),
        np.ones(d),
        rng.normal(size=(1, d)) / d,
        np.zeros(1),
        np.array([[1.0, 0.0]]),
        2,
    )
    proba = head.predict_proba(features)[:, 1]
    threshold = float(np.median(proba))
    op = {"rule": "specificity", "target": 0.5, "threshold": threshold, "positive": 1}
    binary = Predictor(p.extractor, p.cae, head, ["normal", "lesion"], {"operating_point": op})
    preds = binary.predict(images[:40])
    assert [x.label for x in preds] == ["lesion" if q >= threshold else "normal" for q in proba]
    assert {x.threshold for x in preds} == {threshold} and {x.positive for x in preds} == {"lesion"}
    # not the argmax: some labels differ from a 0.5 threshold
    assert any((q >= 0.5) != (q >= threshold) for q in proba)
