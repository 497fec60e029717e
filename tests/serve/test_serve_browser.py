"""End to end in headless Chromium: ``idflux serve --preset tiny`` on 127.0.0.1, two synthetic faces
uploaded, two boxes drawn by mouse, generate; the image appears and its JSON sidecar holds the two
boxes as drawn. A screenshot is kept as a test artifact (``<tmp>/serve.png``; copied to
``$IDFLUX_SERVE_SCREENSHOT`` when set, which is how docs/img/serve.png is made)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("IDFLUX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE = (96, 128)  # height, width: non-square, small enough for the CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"idflux serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"idflux serve did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver (.ci/run does)")
    pytest.importorskip("gradio", reason="gradio not installed: pip install 'idflux[serve]'")
    pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install 'idflux[dev]'")
    port = _free_port()
    out = tmp_path / "out"
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "idflux", "serve", "--preset", "tiny", "--device", "cpu",
                                 "--host", "127.0.0.1", "--port", str(port), "--out-dir", str(out)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_up(url, proc, log, timeout=float(os.environ.get("IDFLUX_SERVE_START_TIMEOUT", "300")))
        yield url, out, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _faces(tmp_path: Path) -> list[Path]:
    from PIL import Image

    from idflux.train.synthetic import SyntheticIdentities

    synth = SyntheticIdentities(4, seed=0)
    paths = []
    for i in (0, 1):
        image, _, _ = synth.render_reference(i, np.random.default_rng(i), 96)
        path = tmp_path / f"face{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _drag(page, canvas_box, scale, off_x, off_y, box):
    x1, y1, x2, y2 = box
    page.mouse.move(canvas_box["x"] + off_x + x1 * scale, canvas_box["y"] + off_y + y1 * scale)
    page.mouse.down()
    for k in range(1, 6):
        f = k / 5
        page.mouse.move(canvas_box["x"] + off_x + (x1 + f * (x2 - x1)) * scale,
                        canvas_box["y"] + off_y + (y1 + f * (y2 - y1)) * scale)
    page.mouse.up()


def test_serve_two_faces_two_boxes_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, out, log = server
    height, width = SIZE
    wanted = [(8, 16, 56, 88), (72, 8, 120, 80)]  # image pixels on the canvas
    faces = _faces(tmp_path)
    shot = tmp_path / "serve.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.set_default_timeout(60_000)
            page.goto(url)
            for i, face in enumerate(faces):
                page.locator(f"#ref{i + 1} input[type=file]").set_input_files(str(face))
                expect(page.locator(f"#face{i + 1} img")).to_be_visible()
                expect(page.locator(f"#face{i + 1}-note")).to_contain_text("face at")
            for elem, value in (("#height", height), ("#width", width), ("#steps", 2)):
                field = page.locator(f"{elem} input")
                field.fill(str(value))
                field.press("Enter")
            canvas = page.locator("#canvas canvas").first
            # the canvas re-renders at the new size: wait for the annotator to report it in the page state
            page.wait_for_timeout(1500)
            box = canvas.bounding_box()
            scale = min(box["width"] / width, box["height"] / height)
            off_x, off_y = (box["width"] - width * scale) / 2, 0.0
            for b in wanted:
                _drag(page, box, scale, off_x, off_y, b)
                page.wait_for_timeout(300)
            # the numbers table lists both boxes, in drawing order = reference order
            table = page.locator("#boxes")
            expect(table).to_contain_text("person 2 (green)")
            text = " ".join(table.inner_text().split())
            rows = re.findall(r"person (\d) \(\w+\) (-?\d+) (-?\d+) (-?\d+) (-?\d+)", text)
            assert [int(r[0]) for r in rows] == [1, 2], text
            for row, want in zip(rows, wanted):
                assert np.allclose([int(c) for c in row[1:]], want, atol=2 + 1 / scale), (text, wanted)
            page.locator("#generate").click()
            expect(page.locator("#result img")).to_be_visible(timeout=180_000)
            expect(page.locator("#downloads")).to_contain_text(".json")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1, f"one PNG expected in {out}, got {pngs}; server log:\n{log.read_text()[-2000:]}"
    meta = json.loads(pngs[0].with_name(pngs[0].name + ".json").read_text())
    assert (meta["height"], meta["width"], meta["steps"]) == (height, width, 2)
    assert len(meta["boxes"]) == 2 and len(meta["refs"]) == 2
    for got, want in zip(meta["boxes"], wanted):  # as drawn: within the mouse's rounding on the scaled canvas
        assert np.allclose(got, want, atol=2 + 1 / scale), (meta["boxes"], wanted)
    from PIL import Image

    with Image.open(pngs[0]) as img:
        assert img.size == (width, height)
    assert "--box" in meta["command"] and meta["preset"] == "tiny"
    if os.environ.get("IDFLUX_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["IDFLUX_SERVE_SCREENSHOT"])
