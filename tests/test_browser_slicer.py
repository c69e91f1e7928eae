"""The interactive viewers in a real browser: JupyterLab driven by a headless Chromium through Playwright.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`); Playwright never downloads
a browser here. Everything runs on 127.0.0.1 without internet.
"""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"),
]
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t3d-browser-test"

NOTEBOOK_CODE = """\
import numpy as np
from transfer3d.viz import Slicer, class_color
x, y, z = np.meshgrid(np.arange(64), np.arange(64), np.arange(32), indexing="ij")
image = np.where(((x - 32) / 28) ** 2 + ((y - 32) / 24) ** 2 + ((z - 16) / 14) ** 2 <= 1, 40.0, -1000.0).astype("float32")
image += 10 * np.sin(z).astype("float32")  # every slice differs
liver = ((x - 24) / 12) ** 2 + ((y - 34) / 10) ** 2 + ((z - 16) / 8) ** 2 <= 1
label = liver.astype("uint8")
s = Slicer(image, label, spacing=(1, 1, 2), labels={"background": 0, "liver": 1}, alpha=1.0, size=256,
           plane="coronal")
s
"""


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


NIIVUE_CODE = """\
import numpy as np
from transfer3d.viz import view
x, y, z = np.meshgrid(np.arange(48), np.arange(48), np.arange(24), indexing="ij")
image = np.where(((x - 24) / 20) ** 2 + ((y - 24) / 18) ** 2 + ((z - 12) / 10) ** 2 <= 1, 40.0, -1000.0).astype("float32")
label = (((x - 18) / 8) ** 2 + ((y - 26) / 7) ** 2 + ((z - 12) / 6) ** 2 <= 1).astype("uint8")
v = view(image, label, spacing=(1, 1, 2), labels={"liver": 1}, alpha=1.0)
assert v.backend == "niivue", v.backend
v
"""


def _write_notebook(path: Path, code: str = NOTEBOOK_CODE):
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "cell", "metadata": {},
                     "outputs": [], "source": code}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    "A JupyterLab server on a free local port, with private config/data/runtime dirs; killed at teardown."
    tmp_path = tmp_path_factory.mktemp("lab")
    (tmp_path / "work").mkdir()
    _write_notebook(tmp_path / "work" / "slicer.ipynb")
    _write_notebook(tmp_path / "work" / "niivue.ipynb", NIIVUE_CODE)
    env = {**os.environ,
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "IPYTHONDIR": str(tmp_path / "ipy"),
           "JUPYTER_PLATFORM_DIRS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    env.pop("JUPYTER_PATH", None)
    port = _free_port()
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter) if jupyter.exists() else shutil.which("jupyter"), "lab", "--no-browser",
           "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={TOKEN}",
           f"--ServerApp.root_dir={tmp_path / 'work'}", "--ServerApp.open_browser=False",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--LabApp.news_url=", "--ServerApp.allow_root=True"]
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("jupyter lab did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        yield base, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (its kernels included)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _open_and_run(p, base: str, profile: Path, notebook: str, extra_args=()):
    "A fresh Chromium profile (Playwright passes it as --user-data-dir); open `notebook`; Run All Cells."
    browser = p.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, args=[*ARGS, *extra_args], headless=True,
        timeout=30_000, viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.set_default_timeout(30_000)
    external = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None)
    # a workspace of its own, so the other test's tabs are not restored
    page.goto(f"{base}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?reset&token={TOKEN}",
              wait_until="domcontentloaded")
    # the notebook is open and its kernel is idle
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=30_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)
    prompt = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt").first
    for _ in range(5):  # the menu command is ignored while the kernel connection is still settling: retry
        page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        try:  # "[*]:" while running, "[1]:" when done
            page.wait_for_function("(el) => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(),
                                   timeout=5_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    return browser, page, external


def _no_error_output(page):
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 0, errors.first.inner_text()


def test_slicer_renders_and_follows_slider(lab_server):
    from playwright.sync_api import sync_playwright

    from transfer3d.viz import class_color

    base, tmp_path = lab_server
    liver = np.array(class_color("liver"))
    with sync_playwright() as p:
        browser, page, external = _open_and_run(p, base, tmp_path / "profile-slicer", "slicer.ipynb")
        try:
            img = page.locator(".t3d-slicer-image")
            img.wait_for(state="visible", timeout=30_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('.t3d-slicer-image');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
            before = img.screenshot(path=str(tmp_path / "slicer_before.png"))
            a = _pixels(before)
            assert (np.abs(a - liver).max(-1) <= 3).sum() > 50, "liver overlay colour not in the rendered slicer"

            readout = page.locator(".t3d-slicer .widget-slider .widget-readout").first
            start = int(readout.inner_text())
            # move the slice slider with the keyboard
            handle = page.locator(".t3d-slicer .widget-slider .noUi-handle").first
            handle.focus()
            for _ in range(8):
                handle.press("ArrowRight")
            deadline = time.monotonic() + 15
            while True:
                after = img.screenshot()
                if after != before or time.monotonic() > deadline:
                    break
                page.wait_for_timeout(200)
            (tmp_path / "slicer_after.png").write_bytes(after)
            b = _pixels(after)
            assert a.shape == b.shape
            assert np.abs(a - b).sum() > 0, "slicer picture did not change after moving the slider"
            assert (np.abs(b - liver).max(-1) <= 3).sum() > 50
            assert int(readout.inner_text()) == start + 8
            _no_error_output(page)
            assert not external, f"requests left the machine: {external[:5]}"
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed
            raise
        finally:
            browser.close()


def test_niivue_view_renders_offline(lab_server):
    "The default `view()` backend draws the volume with WebGL, from the bundled JavaScript only."
    from playwright.sync_api import sync_playwright

    base, tmp_path = lab_server
    with sync_playwright() as p:
        # WebGL without a GPU: Chromium's software rasteriser (SwiftShader) must be allowed explicitly
        browser, page, external = _open_and_run(p, base, tmp_path / "profile-niivue", "niivue.ipynb",
                                                ["--enable-unsafe-swiftshader"])
        try:
            canvas = page.locator(".jp-OutputArea-output canvas").first
            canvas.wait_for(state="visible", timeout=30_000)
            # the static figure is shown beside the widget
            page.locator(".jp-OutputArea-output img").first.wait_for(state="visible", timeout=15_000)
            deadline, shot = time.monotonic() + 20, None
            while time.monotonic() < deadline:  # until the label colour is drawn
                shot = _pixels(canvas.screenshot())
                if (np.abs(shot - np.array([214, 84, 52])).max(-1) <= 40).sum() > 50:
                    break
                page.wait_for_timeout(500)
            assert (np.abs(shot - np.array([214, 84, 52])).max(-1) <= 40).sum() > 50, "no liver colour on the canvas"
            _no_error_output(page)
            assert not external, f"requests left the machine: {external[:5]}"
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))  # what the browser showed
            raise
        finally:
            browser.close()
