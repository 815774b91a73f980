"""medcae from its wheel, outside the checkout: the server, its page and its answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, png_bytes, serve_reaped

pytestmark = [pytest.mark.serve, pytest.mark.ray, pytest.mark.slow]


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the package's sources (the build writes nothing into the checkout)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "medcae", src / "medcae", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("medcae-*.whl")
    return wheel


def _environment_with(wheel: Path, tmp_path: Path) -> Path:
    """A new virtual environment holding the wheel; the test environment's site-packages lend
    it the dependencies, but not its editable install of the checkout (a path listed in a
    ``.pth`` file is not a site folder, so that folder's own ``.pth`` files are not run)."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
        + [str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env / "bin" / "python"


def test_the_wheel_serves_the_page_and_the_predictors_answers_from_another_folder(
    demo_bundle, tmp_path
):
    import httpx

    wheel = _build_wheel(tmp_path)
    python = _environment_with(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(python), "-c", "import medcae.serving.app as m, sys; print(m.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # the wheel, not the checkout

    image = demo_bundle.test_images[0]

    def use(base: str) -> dict:
        with httpx.Client(base_url=base, timeout=60) as client:
            page = client.get("/")
            script = client.get("/static/page.js")
            pred = client.post("/v1/predict", content=png_bytes(image)).json()["prediction"]
            card = client.get("/v1/model/card")
        return {
            "page": (page.status_code, page.headers["content-type"], page.text),
            "script": script.status_code,
            "pred": pred,
            "card": card.status_code,
        }

    got = serve_reaped(
        [str(python), "-m", "medcae", "serve", "--bundle", str(demo_bundle.path)],
        tmp_path,
        elsewhere,
        env,
        use,
    )
    status, ctype, html = got["page"]
    assert status == 200 and ctype.startswith("text/html") and "/static/page.js" in html
    assert got["script"] == 200 and got["card"] == 200
    names = list(got["pred"]["probabilities"])
    probs = [got["pred"]["probabilities"][n] for n in names]
    np.testing.assert_allclose(probs, demo_bundle.expected_proba[0], atol=1e-5)
