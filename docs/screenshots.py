"""Screenshots of MLflow's UI for the docs, taken with headless Chromium driven by Playwright:

- ``docs/mlflow-runs.png``: an experiment's runs table, with ``val_loss`` and ``val_accuracy`` columns in place of
  the (empty) dataset one, a sweep's parent run unfolded to show its jobs' runs;
- ``docs/mlflow-charts.png``: the same runs in the table's chart view, their ``lr``, ``val_accuracy`` and
  ``val_loss`` per epoch drawn together (a sweep's parent run, which has no metrics, hidden from the charts).

The images in docs/ come from a real sweep on a tracking server, by these commands::

    mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db --workers 1
    python -m runner -m scheduler=constant,step,cosine,linear trainer.epochs=8 trainer.device=cpu \\
        tracking.uri=http://127.0.0.1:5000
    python docs/screenshots.py http://127.0.0.1:5000 1

Needs ``pip install playwright`` and a Chromium: Debian's ``chromium`` package by default (``--chromium``), so no
browser download. MLflow 3 opens an experiment on its GenAI overview; the runs table is at
``#/experiments/ID/runs?workflowType=machine_learning`` and its chart view adds ``&compareRunsMode=CHART`` (the
shorter ``#/experiments/ID?workflowType=machine_learning`` also opens the table, but its redirect drops that
parameter). Each page gets a fresh browser profile, so what MLflow keeps in a browser's local storage (the
GenAI/Model training switch, columns, chart layout) starts from MLflow's defaults.

MLflow colours runs by a hash of their ids, which can give two runs of four much the same colour; unless
``--mlflow-colors`` is given, each run with metrics is shown in a colour of its own, in this browser only: the
page's run searches are answered with an ``mlflow.runColor`` tag added (the tag MLflow's colour picker sets).
Nothing is written to the server.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DESCRIPTION = "Screenshots of MLflow's UI: an experiment's runs table and its chart view (docs/mlflow-*.png)."
DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHARTS = "^(lr|val_accuracy|val_loss)$"  # MLflow's chart search takes a regular expression
COLUMNS = ("Dataset", "val_loss", "val_accuracy")  # each clicked once in the Columns menu: off, on, on
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# MLflow 3.17's assistant panel opens by itself on a fresh profile and takes a third of the page: start it closed.
ASSISTANT_CLOSED = """
localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""
TIMEOUT_MS = 60_000
CARD = "experiment-view-compare-runs-card"  # one chart
ROWS = ".ag-center-cols-container .ag-row"  # the runs' rows (the table's and the chart view's list alike)
# The button before a parent run's name that shows its children (MLflow 3.17 gives it no accessible name).
EXPAND_BUTTON = "button[data-component-id$='runs_cells_runnamecellrenderer.tsx_46']"


def runs_url(server: str, experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs table (``charts``: its chart view) in MLflow 3's UI."""
    query = "workflowType=machine_learning" + ("&compareRunsMode=CHART" if charts else "")
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def launch(playwright, chromium: str = CHROMIUM):
    return playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])


def distinct_colors(route) -> None:
    """Answer a run search as the server does, each run with an ``mlflow.runColor`` tag of its own."""
    response = route.fetch()
    body = response.json()
    trained = [run for run in body.get("runs", []) if run.get("data", {}).get("metrics")]  # not a sweep's parent
    for i, run in enumerate(sorted(trained, key=lambda run: run["info"]["run_id"])):
        tags = [tag for tag in run["data"].get("tags", []) if tag["key"] != "mlflow.runColor"]
        run["data"]["tags"] = [*tags, {"key": "mlflow.runColor", "value": COLORS[i % len(COLORS)]}]
    route.fulfill(response=response, json=body)


def open_runs(browser, url: str, width: int, height: int, mlflow_colors: bool):
    """A new page on the runs table at ``url``, loaded; the number of runs it lists."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.add_init_script(ASSISTANT_CLOSED)
    if not mlflow_colors:
        page.route("**/ajax-api/2.0/mlflow/runs/search", distinct_colors)
    page.goto(url)
    matching = page.get_by_text(re.compile(r"^[1-9]\d* matching runs?$"))  # "0 matching runs" while loading
    matching.wait_for()
    close = page.get_by_role("button", name="Close")  # the assistant panel, if it opened after all
    if close.is_visible():
        close.click()
    return page, int(matching.inner_text().split()[0])


def expand_sweeps(page, runs: int) -> None:
    """Open every sweep's row (MLflow lists a parent run's children under it, folded) till ``runs`` rows show."""
    # The rows render a moment after the run count shows (the chart view's list later still on a busy machine):
    # counted before, the expand buttons were none, nothing was opened, and the rows never all showed.
    page.locator(ROWS).first.wait_for(state="attached")
    folded = page.locator(EXPAND_BUTTON)
    for i in range(folded.count()):  # only parents have one, so expanding one does not move the others' index
        folded.nth(i).click()
    all_rows_shown(page, runs)


def all_rows_shown(page, runs: int) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('{ROWS}').length === {runs}")


def shoot_table(browser, server: str, experiment_id: str, out: Path, size: tuple[int, int], mlflow_colors: bool):
    page, runs = open_runs(browser, runs_url(server, experiment_id), *size, mlflow_colors)
    page.get_by_role("button", name="Columns", exact=True).click()
    for column in COLUMNS:
        page.get_by_role("dialog").get_by_text(column, exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Columns", exact=True).blur()  # no focus ring in the picture
    expand_sweeps(page, runs)  # after the columns: changing them can fold the rows again
    for column in COLUMNS[1:]:
        page.get_by_role("columnheader", name=column).first.wait_for()
    page.wait_for_timeout(500)  # the menu's closing animation
    all_rows_shown(page, runs)
    still(page)
    page.screenshot(path=out)
    page.close()
    return runs


def shoot_charts(browser, server: str, experiment_id: str, out: Path, size: tuple[int, int], mlflow_colors: bool):
    page, runs = open_runs(browser, runs_url(server, experiment_id, charts=True), *size, mlflow_colors)
    expand_sweeps(page, runs)
    for parent in page.locator("[role=row]", has=page.locator(EXPAND_BUTTON)).all():
        parent.locator("label", has=page.locator("input.is-visibility-toggle-checkbox")).click()  # no metrics to draw
    page.get_by_placeholder("Search metric charts").fill(CHARTS)
    charts = CHARTS.count("|") + 1
    page.wait_for_function(f"() => document.querySelectorAll('[data-testid={CARD}]').length === {charts}")
    handle = page.get_by_test_id("draggable-card-resize-handle").first.bounding_box()  # taller cards, one for all
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + 140, steps=10)
    page.mouse.up()
    settled(page, "document.querySelectorAll('.js-plotly-plot path.js-line').length", at_least=charts)
    all_rows_shown(page, runs)
    still(page)
    page.screenshot(path=out)
    page.close()
    return runs


def still(page) -> None:
    """No hover or focus marks in the picture: the pointer in a blank corner, nothing focused."""
    page.mouse.move(1, page.viewport_size["height"] - 1)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(300)


def settled(page, count: str, at_least: int, still_ms: int = 1500) -> None:
    """Wait until the JavaScript expression ``count`` is at least ``at_least`` and has not changed for ``still_ms``."""
    page.wait_for_function(f"() => ({count}) >= {at_least}")
    last, unchanged_ms = -1, 0
    while unchanged_ms < still_ms:
        now = page.evaluate(count)
        unchanged_ms = unchanged_ms + 250 if now == last else 0
        last = now
        page.wait_for_timeout(250)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("server", help="the tracking server's URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("experiment_id", help="the experiment's id (the number in its UI address)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the two PNGs (default: docs/)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser executable (default: {CHROMIUM})")
    parser.add_argument("--mlflow-colors", action="store_true", help="keep MLflow's own colours for the runs")
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        parser.exit(1, "docs/screenshots.py needs Playwright: pip install playwright\n")
    size = (args.width, args.height)
    with sync_playwright() as playwright:
        browser = launch(playwright, args.chromium)
        try:
            for name, shoot in (("mlflow-runs.png", shoot_table), ("mlflow-charts.png", shoot_charts)):
                runs = shoot(browser, args.server, args.experiment_id, args.out / name, size, args.mlflow_colors)
                print(f"{args.out / name}: {runs} runs")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
