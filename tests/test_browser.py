"""A real browser: JupyterLab in headless Chromium runs notebook 01's panel and moves its slider.

The widget tests drive the panels from Python; this one checks what a learner sees. It starts a
private JupyterLab (127.0.0.1, a free port, a random token, a throw-away root directory holding a
copy of ``notebooks/01_gradient_clipping.ipynb``), opens the notebook in headless Chromium through
Selenium, runs all cells, and then acts like a learner: the slider is rendered, moving it with the
arrow keys changes its readout, and pressing Train draws a different figure. A screenshot is saved
under ``test-artifacts/``.

To stay well under two minutes, the copy keeps only what the panel needs: the notebook's first
code cell (the imports) and the cell that builds the ``ClippingPanel``. The server and the browser
are always shut down, and every wait is bounded.

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``scripts/ensure_chromium.sh`` installs
them); skipped with the reason when they are absent and cannot be installed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
SOURCE_NOTEBOOK = ROOT / "notebooks" / "01_gradient_clipping.ipynb"
ARTIFACTS = ROOT / "test-artifacts"
BROWSER = Path("/usr/bin/chromium")
DRIVER = Path("/usr/bin/chromedriver")
PANEL_CLASS = "ClippingPanel"

SERVER_START_S = 60  # the server answers about 2 s after start on a quiet machine
KERNEL_READY_S = 120  # page load, lab start-up, kernel start
RUN_ALL_S = 150  # imports and one 40-step training run, on a busy 2-core machine
RETRAIN_S = 90  # one more training run after pressing Train


# ---------------------------------------------------------------------------------------------
# Preconditions
# ---------------------------------------------------------------------------------------------


def _have_browser() -> bool:
    return os.access(BROWSER, os.X_OK) and os.access(DRIVER, os.X_OK)


@pytest.fixture(scope="module")
def browser_binaries() -> None:
    """Chromium and its driver, installed by scripts/ensure_chromium.sh when missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    if not _have_browser():
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "ensure_chromium.sh")], timeout=600, check=False
        )
    if not _have_browser():
        pytest.skip(
            f"{BROWSER} and {DRIVER} are missing and scripts/ensure_chromium.sh could not "
            "install them (needs root and apt-get): apt-get install chromium chromium-driver"
        )


# ---------------------------------------------------------------------------------------------
# The notebook under test
# ---------------------------------------------------------------------------------------------


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def tailored_notebook(source: Path) -> dict[str, Any]:
    """``source`` reduced to its first code cell and the cells that build the panel, unexecuted."""
    nb = json.loads(source.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    panel_cells = [c for c in code if f"{PANEL_CLASS}(" in _source(c)]
    if not code or not panel_cells:
        pytest.fail(f"{source.name} has no code cell that builds a {PANEL_CLASS}")
    cells = [code[0], *[c for c in panel_cells if c is not code[0]]]
    for cell in cells:
        cell["outputs"], cell["execution_count"] = [], None
    nb["cells"] = cells
    nb["metadata"].pop("widgets", None)  # saved widget state of the committed run: not ours
    return nb


# ---------------------------------------------------------------------------------------------
# A private JupyterLab server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.25
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as err:  # noqa: BLE001 (a page still loading raises all sorts)
            last_error = err
        time.sleep(poll_s)
    detail = f" (last error: {last_error!r})" if last_error else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}")


class LabServer:
    """A JupyterLab process with its own token, port, root, settings and runtime directories."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.token = secrets.token_hex(16)
        self.port = _free_port()
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._children: list[Any] = []

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until its API answers."""
        settings = self.workdir / "settings"
        notification = settings / "@jupyterlab" / "apputils-extension"
        notification.mkdir(parents=True)
        # Hide the "get Jupyter news?" toast that covers part of the page.
        (notification / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        env = dict(
            os.environ,
            JUPYTER_CONFIG_DIR=str(self.workdir / "config"),
            JUPYTER_RUNTIME_DIR=str(self.workdir / "runtime"),
            IPYTHONDIR=str(self.workdir / "ipython"),
        )
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.workspaces_dir={self.workdir / 'workspaces'}",
            f"--LabApp.user_settings_dir={settings}",
            "--LabApp.expose_app_in_browser=True",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed when the server is stopped)
        self._log = log
        self.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            url = f"{self.url}/api/status?token={self.token}"
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200

        _wait_for(answers, SERVER_START_S, "the JupyterLab server to answer", poll_s=0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Shut down through the API (which stops the kernels), then make sure all is gone."""
        if self.proc is None:
            return
        import psutil

        try:
            self._children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            self._children = []
        try:
            request = urllib.request.Request(
                f"{self.url}/api/shutdown?token={self.token}", method="POST"
            )
            urllib.request.urlopen(request, timeout=5).close()
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 (not answering: fall through to signals)
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # Kernels run in their own sessions: stop any that outlived the server, by pid.
        for child in self._children:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self._children, timeout=5)
        self._log.close()


@pytest.fixture
def lab(tmp_path: Path, browser_binaries: None) -> Iterator[LabServer]:
    """A running server whose root holds the tailored copy of notebook 01."""
    if not SOURCE_NOTEBOOK.exists():
        pytest.fail(f"{SOURCE_NOTEBOOK.relative_to(ROOT)} is missing")
    server = LabServer(tmp_path)
    server.root.mkdir()
    notebook = tailored_notebook(SOURCE_NOTEBOOK)
    (server.root / SOURCE_NOTEBOOK.name).write_text(json.dumps(notebook), encoding="utf-8")
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def driver(tmp_path: Path, browser_binaries: None) -> Iterator[Any]:
    """Headless Chromium through the system chromedriver (Selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(BROWSER)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=str(DRIVER), log_output=str(tmp_path / "chromedriver.log"))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(60)
    browser.set_script_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


# JavaScript run in the page: the kernel status of the open notebook, and whether a cell still
# waits to run ("[*]" in its prompt).
KERNEL_STATUS_JS = """
const app = window.jupyterapp;
const widget = app && app.shell.currentWidget;
const kernel = widget && widget.sessionContext && widget.sessionContext.session
    && widget.sessionContext.session.kernel;
return kernel ? kernel.status : null;
"""
BUSY_CELLS_JS = """
return Array.from(document.querySelectorAll('.jp-InputPrompt'))
    .filter(p => p.textContent.includes('*')).length;
"""


def _screenshot(browser: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    return path


def _slider_named(browser: Any, label: str) -> Any:
    from selenium.webdriver.common.by import By

    for slider in browser.find_elements(By.CSS_SELECTOR, ".widget-slider"):
        names = slider.find_elements(By.CSS_SELECTOR, ".widget-label")
        if names and names[0].text.strip() == label:
            return slider
    return None


def test_panel_slider_and_train_button_change_the_plot(lab: LabServer, driver: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{lab.url}/lab/tree/{SOURCE_NOTEBOOK.name}?token={lab.token}")
    try:
        _wait_for(
            lambda: driver.execute_script(KERNEL_STATUS_JS) == "idle",
            KERNEL_READY_S,
            "the notebook's kernel to be idle",
            poll_s=0.5,
        )
        driver.execute_script("return window.jupyterapp.commands.execute('notebook:run-all-cells')")

        def panel_image() -> str | None:
            images = driver.find_elements(By.CSS_SELECTOR, ".widget-output img")
            return images[-1].get_attribute("src") if images else None

        def all_cells_done() -> bool:
            idle = driver.execute_script(KERNEL_STATUS_JS) == "idle"
            return idle and driver.execute_script(BUSY_CELLS_JS) == 0 and bool(panel_image())

        _wait_for(all_cells_done, RUN_ALL_S, "all cells to run and the panel to draw", poll_s=0.5)
        errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type]")
        tracebacks = [e.text for e in errors if "Traceback" in e.text or "Error" in e.text[:200]]
        assert not tracebacks, f"a cell failed in the browser:\n{tracebacks[0][:2000]}"

        sliders = driver.find_elements(By.CSS_SELECTOR, ".widget-slider")
        assert sliders, "no .widget-slider rendered"
        slider = _slider_named(driver, "lr")
        assert slider is not None, "the panel has no slider labelled 'lr'"
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        before_readout, before_image = readout.text, panel_image()

        # Like a learner: click the handle, then move it with the keyboard.
        handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        for _ in range(5):
            handle.send_keys(Keys.ARROW_LEFT)
        _wait_for(lambda: readout.text != before_readout, 10, "the slider readout to change")
        after_readout = readout.text
        # A lower learning rate must not be mistaken for the old one.
        assert float(after_readout) < float(before_readout), (before_readout, after_readout)

        train = driver.find_element(By.XPATH, "//button[contains(., 'Train')]")
        train.click()
        new_image = _wait_for(
            lambda: (src := panel_image()) and src != before_image and src,
            RETRAIN_S,
            "the panel to draw a new figure after Train",
            poll_s=0.5,
        )
        assert new_image != before_image
        status = driver.find_elements(By.CSS_SELECTOR, ".widget-html")
        assert any("loss" in s.text.lower() for s in status), "no status line after training"
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", slider)
        _screenshot(driver, "browser_01_clipping_panel.png")
    except BaseException:
        _screenshot(driver, "browser_01_clipping_panel_failure.png")
        print(lab.log_tail())
        raise
