"""Where the evidence lies: each location's exact contribution to the predicted class's score.

The classifier is linear on the CAE's code map ``z`` (``latent x h x w``) after a standard
scaler, so its decision for class ``k`` splits exactly over the locations of the code map:

- ``flatten`` (the default):
  ``d_k = b_k + sum_loc sum_c w[k, c, loc] * (z[c, loc] - mean) / scale``; a location's
  contribution is its inner sum over channels.
- ``avg``: the pooled code is the mean over locations, so each location contributes
  ``sum_c w[k, c] * (z[c, loc] / (h * w) - mean_c / (h * w)) / scale_c``.
- ``avgmax``: the average half as for ``avg``; each channel's max term goes, whole, to the
  location that holds the maximum.

A representation that adds the tapped maps' avg+max pooled features (``cae_concat``,
``frozen_tap``) splits the same way over the tap's locations, summed with the codes' grid
when both have the same size. ``frozen_final`` (the backbone's pooled last layer) keeps no
locations: :class:`ExplainUnavailable`.

In every case the contributions plus the intercept equal the decision value (a test checks
it to 1e-4), so the map is not an approximation. For a binary head the decision is the logit of
the second class; the map of the first class is its negation. Positive values are evidence for
the explained class, negative against it. The map has the code map's resolution (e.g. 4x4 for
a 112 px input at stage5 with a stride-2 CAE) and is drawn over the image the model saw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from medcae.data.preprocess import prepare_image

if TYPE_CHECKING:
    from medcae.inference.predictor import Prediction, Predictor


@dataclass
class Explanation:
    """One image's prediction and the per-location contributions to one class's decision.

    Attributes:
        prediction: The prediction (label, probabilities, OOD verdict).
        label: The explained class (the predicted one unless asked otherwise).
        contributions: ``(h, w)`` contribution of each code-map location to that class's
            decision value.
        intercept: The class's intercept; ``contributions.sum() + intercept == decision``.
        decision: The class's decision value (logit for logistic regression).
        image: uint8 ``(R, R, 3)``: the image as the model saw it (prepared to its input).
        pool: ``representation/cae pool``: what the classifier's vector was made of.
    """

    prediction: Prediction
    label: str
    contributions: np.ndarray
    intercept: float
    decision: float
    image: np.ndarray
    pool: str


def explain(predictor: Predictor, image: np.ndarray, label: str | None = None) -> Explanation:
    """Predict one decoded image and split the explained class's decision over locations.

    Args:
        predictor: A loaded bundle's predictor.
        image: One decoded image, uint8 ``(H, W)`` or ``(H, W, 3)``.
        label: Class (or finding) to explain; default the predicted class, or the most
            probable finding of a multi-label model.

    Raises:
        ValueError: An unknown ``label``, naming the known ones.
    """
    out = predictor.backbone([image])  # one backbone pass for the label and the map
    (pred,) = predictor.predictions(predictor.head_outputs(out))
    name = pred.label if label is None else label
    if label is None and predictor.multilabel:  # findings: the most probable one's map
        name = max(pred.probabilities, key=pred.probabilities.__getitem__)
    if name not in predictor.label_names:
        raise ValueError(f"unknown class {name!r}; the model knows {predictor.label_names}")
    rep = predictor.representation
    if "final" in rep.parts:
        raise ExplainUnavailable(
            f"the representation {rep.name!r} uses the backbone's pooled last layer, which "
            "keeps no locations: there is no map to draw"
        )
    k = predictor.label_names.index(name)
    maps = torch.from_numpy(out["maps"]).float()
    with torch.no_grad():
        z = predictor.cae.encode(maps)[0].numpy().astype(np.float64)  # (latent, h, w)
    head = predictor.head
    binary = head.coef.shape[0] == 1 and not head.multilabel
    row = 0 if binary else k
    sign = -1.0 if binary and k == 0 else 1.0
    w = head.coef[row] / head.scale  # weight per standardised feature, unscaled
    pool = predictor.cae.cfg.pool
    grids, start = [], 0
    for part in rep.parts:  # the head's vector is these parts concatenated, in order
        values, how = (
            (z, pool) if part == "codes" else (out["maps"][0].astype(np.float64), "avgmax")
        )
        c, h, wd = values.shape
        dim = {"flatten": c * h * wd, "avg": c, "avgmax": 2 * c}[how]
        grids.append(
            _contributions(values, w[start : start + dim], head.mean[start : start + dim], how)
        )
        start += dim
    if len({g.shape for g in grids}) > 1:
        raise ExplainUnavailable(
            f"the parts of {rep.name!r} have maps of different sizes "
            f"({[g.shape for g in grids]}): no single grid adds up to the decision"
        )
    contrib = sign * np.sum(grids, axis=0)
    intercept = sign * float(head.intercept[row])
    decision = sign * float(head.decision(predictor.features(out, maps))[0, row])
    prepared = prepare_image(image, predictor.extractor.cfg.resolution)
    return Explanation(pred, name, contrib, intercept, decision, prepared, f"{rep.name}/{pool}")


class ExplainUnavailable(ValueError):
    """The bundle's representation has no spatial map to split its decision over."""


def _contributions(z: np.ndarray, w: np.ndarray, mean: np.ndarray, pool: str) -> np.ndarray:
    """``(h, w)`` contributions of code-map ``z`` ``(C, h, w)`` to ``(x - mean) @ w``."""
    c, h, wd = z.shape
    n = h * wd
    if pool == "flatten":
        return ((z.reshape(c, n) - mean.reshape(c, n)) * w.reshape(c, n)).sum(0).reshape(h, wd)
    flat = z.reshape(c, n)
    out = ((flat - mean[:c, None]) * w[:c, None]).sum(0) / n  # the average half
    if pool == "avgmax":
        w_max, m_max = w[c:], mean[c:]
        arg = flat.argmax(axis=1)
        for ch in range(c):
            out[arg[ch]] += w_max[ch] * (flat[ch, arg[ch]] - m_max[ch])
    elif pool != "avg":
        raise ValueError(f"unknown pool {pool!r}")
    return out.reshape(h, wd)


def heatmap_png(exp: Explanation, size: int | None = None) -> bytes:
    """The contributions drawn over the model's view of the image, as a PNG.

    Red is evidence for the explained class, blue against it; opacity grows with the
    magnitude (scaled to the largest one). The map is upsampled bilinearly to the image.

    Args:
        exp: An explanation.
        size: Output side in pixels; default the model's input side.
    """
    side = size or exp.image.shape[0]
    base = Image.fromarray(exp.image).resize((side, side), Image.Resampling.BILINEAR)
    c = exp.contributions
    peak = float(np.abs(c).max()) or 1.0
    grid = Image.fromarray((c / peak).astype(np.float32), mode="F")
    v = np.asarray(grid.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[..., 0] = np.where(v > 0, 230, 30)
    rgba[..., 1] = 40
    rgba[..., 2] = np.where(v > 0, 30, 230)
    rgba[..., 3] = np.clip(np.abs(v) * 170, 0, 255).astype(np.uint8)
    out = Image.alpha_composite(base.convert("RGBA"), Image.fromarray(rgba, "RGBA"))
    buf = io.BytesIO()
    out.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
