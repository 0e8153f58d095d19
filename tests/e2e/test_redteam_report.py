"""`bastion redteam run` against the demo served over HTTP (query auditing on, analysts' label-only
keys), small budgets; its JSON read, its HTML opened in headless Chromium (Debian's, driven by
Playwright) and a screenshot saved to artifacts/redteam-report.png. Then `bastion status` against the
same server, after the attack, with an admin's and an analyst's key."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from bastion.redteam_demo import MODEL, build_target
from tests.helpers import RunningServer, create_key, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")


def chromium() -> Path:
    """Debian's Chromium; installed when missing (the project's script if it is there)."""
    if not CHROMIUM.exists():
        script = ROOT / "scripts" / "ensure-chromium"
        if script.exists():
            subprocess.run([str(script)], check=True, timeout=900)
        else:
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, timeout=900)
    return CHROMIUM


@dataclass
class Run:
    server: RunningServer
    config: Path
    out: Path
    done: subprocess.CompletedProcess[str]
    report: dict  # type: ignore[type-arg]
    keys: list[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("redteam")
    target = build_target(root / "demo")
    server = start_server(target.config, root / "server.log")
    try:
        out = root / "out"
        np.savez(root / "rows.npz", x=target.nonmembers[0])
        np.savez(root / "members.npz", x=target.members[0], y=target.members[1])
        np.savez(root / "nonmembers.npz", x=target.nonmembers[0], y=target.nonmembers[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RT_")}
        for name in ("RT_KEY", "RT_THIEF", "RT_EVADER"):
            env[name] = create_key(target.config, "analyst")
        command = [sys.executable, "-m", "bastion.cli", "redteam", "run", "--url", server.base_url]
        command += ["--model", MODEL, "--data", str(root / "rows.npz"), "--out", str(out)]
        command += ["--members", str(root / "members.npz"), "--nonmembers", str(root / "nonmembers.npz")]
        command += ["--key-env", "RT_KEY", "--extraction-key-env", "RT_THIEF", "--evasion-key-env", "RT_EVADER"]
        command += ["--extraction-queries", "120", "--evasion-queries", "120", "--max-fidelity", "0.99"]
        command += ["--max-auc", "0.65", "--require-containment"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        report = json.loads((out / "redteam.json").read_text()) if (out / "redteam.json").exists() else {}
        yield Run(server, target.config, out, done, report, [env[n] for n in ("RT_KEY", "RT_THIEF", "RT_EVADER")])
    finally:
        server.stop()


def test_the_gate_passes_and_says_what_it_measured(run: Run) -> None:
    assert run.done.returncode == 0, run.done.stderr
    assert "extraction: fidelity" in run.done.stdout and "contained at" in run.done.stdout
    assert "\x1b[" not in run.done.stderr  # no progress bar when stdout is not a terminal
    assert run.report["passed"] is True and run.report["failures"] == []


def test_extraction_records_fidelity_and_where_containment_struck(run: Run) -> None:
    ex = run.report["extraction"]
    assert ex["points"], "the thief learnt from some answers before containment"
    assert 0.5 < ex["fidelity"] <= 1.0
    # Containment struck inside the budget: the thief's stream of synthetic rows is flagged.
    assert ex["contained_at"] is not None and ex["contained_at"] < ex["budget"]
    assert ex["queries"] == ex["contained_at"]  # the 403 ended the attack
    assert all(q <= ex["contained_at"] for q, _ in ex["points"])


def test_evasion_and_membership_are_recorded(run: Run) -> None:
    ev, mi = run.report["evasion"], run.report["membership"]
    assert ev["contained_at"] is not None and ev["success_rate"] == 0.0  # stopped before the boundary
    assert ev["samples"] and ev["samples"][0]["points"]
    # Label-only answers of a logistic regression: membership is a coin toss, and genuine rows are
    # not quarantined (every member and non-member asked).
    assert mi["contained_at"] is None and mi["queries"] >= 2 * 280
    assert len(mi["points"]) >= 3 and 0.35 < mi["auc"] < 0.65


def test_the_report_names_no_key(run: Run) -> None:
    text = (run.out / "redteam.html").read_text() + (run.out / "redteam.json").read_text()
    text += run.done.stdout + run.done.stderr
    for key in run.keys:
        assert key not in text and key.split("_", 2)[2] not in text  # bst_<id>_<secret>


def test_the_html_report_renders_in_chromium(run: Run) -> None:
    from playwright.sync_api import sync_playwright

    html_path = run.out / "redteam.html"
    text = html_path.read_text()
    assert "<script" not in text
    # No link to anything: XML namespaces name URIs but fetch nothing (the requests below prove it).
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:|//)""", text)
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium()), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri())
            for section in ("#summary", "#extraction", "#membership", "#evasion", "#thresholds"):
                assert page.locator(section).is_visible(), section
            assert page.locator("#verdict").inner_text().strip() == "GATE PASSED"
            figures = page.locator("figure svg")
            assert figures.count() == 3
            for i in range(3):
                box = figures.nth(i).bounding_box()
                assert box is not None and box["width"] > 400 and box["height"] > 150
            assert "contained" in page.locator("#extraction").inner_text()
            page.screenshot(path=str(artifacts / "redteam-report.png"), full_page=True)
        finally:
            browser.close()
    assert requests == [html_path.as_uri()]  # self-contained: nothing else was fetched
    shutil.copy(html_path, artifacts / "redteam-report.html")


def _status(run: Run, key: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STATUS_KEY": key}
    command = [sys.executable, "-m", "bastion.cli", "status", "--url", run.server.base_url]
    return subprocess.run(
        [*command, "--key", "env:STATUS_KEY", *extra], capture_output=True, text=True, env=env, timeout=60
    )


def test_status_summarises_the_server_for_an_admin(run: Run) -> None:
    done = _status(run, create_key(run.config, "admin"), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["live"] and status["ready"] and status["admin"]
    assert status["server"]["name"] == "bastion"
    assert status["models"][MODEL]["versions"] == ["1"]
    # The red team's thief and evader were quarantined: two incidents, two keys, still in force.
    assert sum(status["incidents_by_state"].values()) >= 2
    assert {q["model"] for q in status["quarantined_keys"]} == {MODEL}
    assert len(status["quarantined_keys"]) == 2
    assert status["requests"]["allow"] > 0 and status["denials_by_status"].get("403", 0) >= 2
    text = _status(run, create_key(run.config, "admin")).stdout
    assert "quarantined  key:" in text and f"model    {MODEL}  versions 1" in text
    # A release shows at once: the key store says who is quarantined, not the incidents (found by
    # the operations red team: a released key was still listed).
    admin = create_key(run.config, "admin")
    released = status["quarantined_keys"][0]["principal"].removeprefix("key:")
    with httpx.Client(base_url=run.server.base_url, headers={"Authorization": f"Bearer {admin}"}) as client:
        assert client.post(f"/v2/admin/keys/{released}/release").status_code == 200
    after = json.loads(_status(run, admin, "--json").stdout)
    assert [q["principal"] for q in after["quarantined_keys"]] == [
        q["principal"] for q in status["quarantined_keys"] if q["principal"] != f"key:{released}"
    ]


def test_status_with_an_analyst_key_says_what_it_cannot_see(run: Run) -> None:
    done = _status(run, create_key(run.config, "analyst"), "--model", MODEL, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert not status["admin"] and status["quarantined_keys"] == [] and status["requests"] == {}
    assert any("/metrics: HTTP 403" in n for n in status["notes"])
    assert status["models"][MODEL]["versions"] == ["1"]


def test_status_with_an_analyst_key_and_no_model_says_how_to_see_one(run: Run) -> None:
    """Red team of issue 12, second pass, F8: the analyst's models were silently missing."""
    done = _status(run, create_key(run.config, "analyst"))
    assert done.returncode == 0, done.stderr
    assert "name them with --model NAME" in done.stdout
    assert "HTTP Request" not in done.stderr  # httpx's per-request lines are off (F6)


def test_status_refuses_a_wrong_key_without_echoing_it(run: Run) -> None:
    done = _status(run, "bst_0000000000000000_not-a-real-key")
    assert done.returncode == 2 and "HTTP 401" in done.stderr
    assert "not-a-real-key" not in done.stderr + done.stdout
