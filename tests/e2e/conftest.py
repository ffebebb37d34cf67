"""Browser tests of the Studio: a real `tunery studio` server driven by Playwright in Debian's Chromium.

Skipped cleanly when the `playwright` package or /usr/bin/chromium is missing (`playwright install` is
never needed: the system browser is used). Screenshots go to tests/e2e/screenshots/ (gitignored).
"""

from __future__ import annotations

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

import pytest

CHROMIUM = os.environ.get("TUNERY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test in a real browser (needs playwright and chromium)")


def pytest_collection_modifyitems(config, items):
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed"
    if reason is None and not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudioServer:
    """`python -m tunery studio` in a child process; restartable on the same port and runs folder."""

    def __init__(self, runs_dir: Path, env: dict[str, str]):
        self.runs_dir = runs_dir
        self.env = env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = runs_dir.parent / "studio-server.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tunery", "studio", "--port", str(self.port),
                                          "--runs-dir", str(self.runs_dir)], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Studio exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/info", timeout=2) as r:
                    json.load(r)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the Studio did not start within 60 s")

    def stop(self) -> None:
        """Stop the server only (training children live in their own sessions and keep running)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)


@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory) -> Path:
    """The GSM8K sample shipped for examples (question/answer rows), or the shared GSM8K train file's head."""
    sample = REPO / "examples" / "data" / "gsm8k_sample.jsonl"
    if sample.is_file():
        return sample
    src = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not src.is_file():
        pytest.skip("no GSM8K sample (examples/data/gsm8k_sample.jsonl)")
    out = tmp_path_factory.mktemp("e2e-data") / "gsm8k_sample.jsonl"
    with open(src) as f:
        out.write_text("".join(next(f) for _ in range(64)))
    return out


@pytest.fixture(scope="module")
def studio(tmp_path_factory, smol_path) -> StudioServer:
    """A fresh Studio over an empty runs folder. `smol_path` converts the embedded model once per session
    into the cache (TUNERY_CACHE, else ~/.cache/tunery) that the server and its children then reuse.
    Module-scoped, like `browser`: the server, Chromium and Playwright's thread end with the browser
    tests, not with the whole session (the later tests then run, and fork, without them)."""
    runs = tmp_path_factory.mktemp("studio") / "runs"
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    server = StudioServer(runs, env)
    server.start()
    yield server
    server.stop()
    _end_children(runs)


def _end_children(runs: Path) -> None:
    """Children the Studio started that still run (a run left training, an export) end with the server."""
    import sqlite3

    from tunery.studio import procs

    db = runs / "studio.db"
    if not db.is_file():
        return
    con = sqlite3.connect(str(db))
    try:
        jobs = con.execute("SELECT pid, pid_start FROM jobs WHERE state='running'").fetchall()
    finally:
        con.close()
    for pid, start in jobs:
        if procs.alive(pid, start):
            procs.signal_group(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def shot():
    """shot(page, name): a full-page screenshot into tests/e2e/screenshots/."""
    SCREENSHOTS.mkdir(exist_ok=True)

    def take(page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.evaluate("window.scrollTo(0, 0)")  # sticky bars would otherwise repeat down the image
        page.screenshot(path=str(path), full_page=True)
        return path

    return take
