"""The MLflow UI as a new user meets it, in a real headless Chromium: after a tiny run and its fully
cached re-run, the URL ``drift run`` prints opens the run on the runs view; the cached run says it
was served from cache; the registered version shows the verdict of the run that decided (not
overwritten by the re-run) and links to its rollouts, whose page lists the trajectories.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Skipped only when
they are missing outside CI; in CI (``$CI`` set) a missing browser fails the test.
``DRIFT_UI_SCREENSHOTS=<dir>`` saves the pages it opens (docs/images/ holds a set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, chromium_binaries, free_port
from helpers import drift_cli, mlflow_run_id

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--set", "data.arith.n=4", "--set", "train.max_steps=1", "--set", "eval.data.arith.n=2"]

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        chromium_binaries() is None and not os.environ.get("CI"),
        reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver); "
        "in CI this test runs and fails without them",
    ),
]


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    """``mlflow server`` on a free 127.0.0.1 port over a fresh sqlite store: ``(url, workdir)``."""
    workdir = tmp_path_factory.mktemp("ui")
    (workdir / ".drift").mkdir()
    port = free_port()
    log = open(workdir / "mlflow-server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / '.drift' / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        # MLflow 3's job execution (15 huey consumer interpreters for GenAI jobs) is a feature the
        # story never shows: off, as in conftest's server; its own session so every process ends
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(workdir / 'mlflow-server.log').read_text()[-2000:]}"
                    ) from exc
                time.sleep(1)
        yield url, workdir
    finally:
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):  # uvicorn's workers share its session: end all
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_a_new_user_reads_the_story_in_the_mlflow_ui(mlflow_ui, prefect_server, tiny_answering_dir):
    assert chromium_binaries(), "chromium and chromedriver must be installed where $CI is set (.ci/run)"
    url, workdir = mlflow_ui
    shutil.copytree(tiny_answering_dir, workdir / "reference")
    env = {**prefect_server, "DRIFT_MLFLOW_UI_URL": url}  # where the printed URLs point
    args = ["run", str(TINY), "--set", f"reference_model.path={workdir / 'reference'}", *SMALL]
    cold = drift_cli(args, workdir, env, check=True)
    cached = drift_cli(args, workdir, env, check=True)
    cold_id, cached_id = mlflow_run_id(cold.stdout), mlflow_run_id(cached.stdout)
    printed = re.search(r"MLflow run: (\S+)", cached.stdout)[1]
    assert printed.startswith(f"{url}/#/experiments/") and printed.endswith(
        f"/runs/{cached_id}?workflowType=machine_learning"
    ), printed
    shots = Path(os.environ["DRIFT_UI_SCREENSHOTS"]) if os.environ.get("DRIFT_UI_SCREENSHOTS") else None

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    cold_name = client.get_run(cold_id).info.run_name
    cached_name = client.get_run(cached_id).info.run_name
    [version] = client.search_model_versions("name = 'drift-tiny'")
    decided = version.tags["drift.promotion"]
    assert decided in ("promoted", "not promoted")

    with Browser(*chromium_binaries()) as browser:
        # 1. The printed URL: the cached run's page, on the model-training (runs) view, saying it
        # was served from cache, with its per-turn table and links.
        browser.open(printed)
        page = browser.wait_for_text(cached_name, f"{cached_name}: all cached", "reference multi@t", "Links")
        assert "Model training" in page
        assert browser.local_storage("mlflow.workflowType") in (
            None,
            '"machine_learning"',
            "machine_learning",
        )
        if shots:
            browser.screenshot(shots / "mlflow-run.png")

        # 2. The runs table lists both runs, by names that differ in their first characters.
        browser.open(printed.split("/runs/")[0] + "/runs?workflowType=machine_learning")
        browser.wait_for_text(cold_name, cached_name)
        if shots:
            browser.screenshot(shots / "mlflow-runs.png")

        # 3. The version page: the verdict, written by the run that decided (the cold run), not
        # overwritten by the cached re-run; and a link to the rollouts.
        browser.open(f"{url}/#/models/drift-tiny/versions/{version.version}")
        page = browser.wait_for_text("drift.promotion.reason", "drift.promotion.run_id", "challenger")
        assert f"drift.promotion.run_id\t\n{cold_id}" in page or re.search(
            rf"drift\.promotion\.run_id\s+{cold_id}", page
        ), page
        assert re.search(rf"drift\.promotion\s+{decided}\n", page), page
        [rollouts] = set(browser.hrefs("/artifacts/rollouts"))
        if shots:
            browser.screenshot(shots / "mlflow-version.png")

        # 4. The rollouts: the trajectories parquet, a browsable table and the manifest.
        browser.open(rollouts)
        browser.wait_for_text("sample.json", "manifest.json", ".parquet")
        if shots:
            browser.screenshot(shots / "mlflow-rollouts.png")
