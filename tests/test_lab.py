"""`make lab` starts JupyterLab that answers on 127.0.0.1 (as root too, the usual container case)."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_make_lab_serves_the_api_on_loopback():
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("make lab installs first; this test runs after make test's install")
    port, token = _free_port(), "labkit-test-token"
    args = f"--no-browser --port={port} --ServerApp.token={token} --ServerApp.port_retries=0"
    proc = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # one process group: make, jupyter and its kernels stop together
    )
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    status, deadline = None, time.monotonic() + 120
    try:
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    status = json.loads(reply.read())
            except OSError:
                time.sleep(0.5)
        listening = {
            c.laddr.ip
            for p in psutil.Process(proc.pid).children(recursive=True)
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert status is not None, f"JupyterLab did not answer on {url}:\n{out[-3000:]}"
    assert "started" in status
    assert listening and listening <= {"127.0.0.1"}, listening
    if os.geteuid() == 0:
        assert "Running as root is not recommended" not in out
