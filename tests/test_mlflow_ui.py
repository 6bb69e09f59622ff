"""MLflow's own UI, in a real headless Chromium (Debian's ``chromium`` driven by Playwright), on a real ``mlflow
server`` that a real sweep of ``python -m runner`` logged to: the runs table is where the runner's end-of-run line
says it is (``#/experiments/ID?workflowType=machine_learning``), and the plain ``#/experiments/ID`` opens MLflow 3's
GenAI overview instead, which is why that query is there. Also docs/screenshots.py, which draws docs/'s pictures."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, run_runner

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no {CHROMIUM} (Debian: apt-get install -y chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip(
    "playwright.sync_api", reason="no Playwright (pip install playwright)", exc_type=ImportError
).sync_playwright

pytestmark = pytest.mark.slow  # a tracking server, a two-job sweep and a browser: about a minute here

EXPERIMENT = "ui"
SCHEDULES = ["constant", "cosine"]
TIMEOUT_MS = 60_000  # a page load is seconds on this 2-core machine; generous for a loaded CI
VIEWPORT = {"width": 1400, "height": 900}
# The button before a parent run's name that unfolds its children (MLflow 3.17 gives it no accessible name).
EXPAND_BUTTON = "button[data-component-id$='runs_cells_runnamecellrenderer.tsx_46']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact folder; at the end its process
    group (uvicorn, MLflow's job runner and its huey consumers) is terminated."""
    folder = tmp_path_factory.mktemp("mlflow-ui")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"]
    command += ["--artifacts-destination", str(folder / "artifacts")]
    uri = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:  # a file, not a pipe: the UI's requests would fill a pipe
        process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180  # a fresh store's migrations and the app's start: ~40 s on 2 cores
            while True:
                assert process.poll() is None, f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}"
                try:
                    if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "mlflow server did not answer /health within 180 s"
                time.sleep(0.5)
            yield uri, folder
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def sweep(server):
    """A two-job sweep logged to the server: (server URL, experiment id, {run name: parent run id or None})."""
    uri, folder = server
    result = run_runner(
        "-m",
        f"scheduler={','.join(SCHEDULES)}",
        "trainer.epochs=3",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        # The default, said outright (run_runner may turn it off): MLflow 3's GenAI side bar lists "Training runs"
        # only when some run has logged a model; runs without one count there as evaluation runs.
        "tracking.log_model=true",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        cwd=folder,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id])  # every run the UI lists, a sweep's parent run among them if any
    names = {run.info.run_name: run.data.tags.get("mlflow.parentRunId") for run in runs}
    assert {f"scheduler={schedule}" for schedule in SCHEDULES} <= set(names), names
    return uri, experiment_id, names, result.stderr


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A page in a browser context of its own: a fresh profile, nothing in its local storage."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def test_the_query_opens_the_runs_table_with_every_run_of_the_sweep(sweep, page):
    uri, experiment_id, names, log = sweep
    url = f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert f"MLflow runs table: {url}" in log  # the address the runner's last line gives is the one checked here
    page.goto(url)
    page.get_by_text(re.compile(rf"^{len(names)} matching runs?$")).wait_for()
    for header in ("Run Name", "Created", "Duration", "Source", "Models"):
        page.get_by_role("columnheader", name=header, exact=True).first.wait_for()
    assert re.search(rf"#/experiments/{experiment_id}/runs\?workflowType=machine_learning", page.url)
    for name, parent in names.items():
        if parent is None:  # a top-level run (a sweep's parent run lists its jobs folded under it)
            page.get_by_role("link", name=name, exact=True).wait_for()
    folded = page.locator(EXPAND_BUTTON)
    for i in range(folded.count()):
        folded.nth(i).click()
    for name in names:
        page.get_by_role("link", name=name, exact=True).wait_for()


def test_without_the_query_a_fresh_browser_opens_the_genai_overview_and_no_runs_table(sweep, page):
    uri, experiment_id, names, _ = sweep
    page.goto(f"{uri}/#/experiments/{experiment_id}")
    page.wait_for_url(re.compile(rf"#/experiments/{experiment_id}/overview/\w+\?workflowType=genai$"))
    # Text, not roles: a first-visit guidance popover over the overview hides the rest from the accessibility tree.
    page.get_by_text("Overview", exact=True).first.wait_for()
    for genai_tab in ("Traces", "Sessions", "Evaluation runs", "Prompts"):
        page.get_by_text(genai_tab, exact=True).first.wait_for()
    # The runs are a click away, on the same table under the GenAI switch: "Training runs" in the side bar (there
    # because the runs logged models, see ``sweep``).
    training_runs = page.locator(f'a[href="#/experiments/{experiment_id}/runs?workflowType=genai"]')
    assert training_runs.inner_text() == "Training runs"
    page.wait_for_timeout(2000)  # anything still loading would have shown by now
    assert page.get_by_text("Run Name", exact=True).count() == 0
    assert page.locator(".ag-row").count() == 0  # no row of any table
    for name in names:
        assert page.get_by_text(name, exact=True).count() == 0, name


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_docs_screenshots_script_draws_the_runs_table_and_their_charts(sweep, tmp_path):
    uri, experiment_id, names, _ = sweep
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "screenshots.py"), uri, experiment_id, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for picture in ("mlflow-runs.png", "mlflow-charts.png"):
        assert f"{tmp_path / picture}: {len(names)} runs" in done.stdout
        assert png_size(tmp_path / picture) == (1400, 900)
