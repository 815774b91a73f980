"""The HTTP client and `medcae predict` when no server is there."""

import subprocess
import sys

import pytest
from helpers import refusing_port

from medcae.serving.client import ClientError, MedcaeClient


def test_client_reports_a_down_server_clearly():
    with refusing_port() as port:
        client = MedcaeClient(f"http://127.0.0.1:{port}", timeout=3)
        with pytest.raises(ClientError, match="cannot reach the medcae server"):
            client.health()


def test_cli_predict_exits_1_with_a_message_when_server_is_down(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with refusing_port() as port:
        out = subprocess.run(
            [sys.executable, "-m", "medcae.cli.main", "predict", "--timeout", "3"]
            + ["--url", f"http://127.0.0.1:{port}", str(img)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert "cannot reach the medcae server" in out.stderr and "Traceback" not in out.stderr
