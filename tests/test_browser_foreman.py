"""The foreman dashboard in a real headless Chromium: a job's progress bar reaches 100%, a killed worker shows lost."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from conftest import worker_env
from foreman import Foreman
from tasks import cheat_square, slow_whoami

pytestmark = pytest.mark.slow  # a real headless browser

playwright = pytest.importorskip("playwright.sync_api")


def test_progress_bar_reaches_100_percent_and_a_killed_worker_shows_lost(browser_page) -> None:
    page = browser_page
    with Foreman(port=0, local_workers=2, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        fm.wait_for_workers(2)
        page.goto(fm.dashboard_login_url)  # logs in (the cookie), then the dashboard
        playwright.expect(page.locator("#live")).to_have_text("live", timeout=10_000)

        job = fm.imap(slow_whoami, range(600), chunksize=4)
        consumer = threading.Thread(target=lambda: list(job))
        consumer.start()
        row = page.locator(f'tr[data-job="{job.id}"]')
        playwright.expect(row.locator(".pill")).to_have_text("running", timeout=10_000)
        bar = row.locator('[role="progressbar"]')
        first = float(bar.get_attribute("aria-valuenow"))
        playwright.expect(row.locator(".pill")).to_have_text("done", timeout=60_000)
        playwright.expect(bar).to_have_attribute("aria-valuenow", "100.00", timeout=10_000)
        assert first < 100
        consumer.join(timeout=30)

        victim = fm._local.processes[0]
        victim_id = f"local-{os.getpid()}-0"
        os.kill(victim.pid, signal.SIGKILL)
        worker_row = page.locator(f'tr[data-worker="{victim_id}"]')
        playwright.expect(worker_row.locator(".pill")).to_have_text("lost", timeout=15_000)
        playwright.expect(worker_row).to_have_class("gone", timeout=5_000)
        playwright.expect(page.locator("#events")).to_contain_text(f"worker {victim_id} lost", timeout=5_000)


def test_reputation_leaderboard_and_ban_on_the_dashboard(browser_page, spawn_worker) -> None:
    page = browser_page
    with Foreman(port=0, local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        spawn_worker(fm.address, "--worker-id", "stranger", "--no-dashboard",
                     env=worker_env(CROWDCOMPUTE_TEST_CHEAT="1"))
        fm.wait_for_workers(2)
        page.goto(fm.dashboard_login_url)  # logs in (the cookie), then the dashboard
        playwright.expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        assert fm.map(cheat_square, range(12), spot_check=1.0, chunksize=1) == [x * x for x in range(12)]

        stranger = page.locator('tr[data-worker="stranger"]')
        playwright.expect(stranger.locator(".trust .badge")).to_have_text("quarantined", timeout=10_000)
        playwright.expect(stranger.locator(".trust")).to_contain_text("0✓")
        local = page.locator('#workers tr[data-worker^="local-"]')
        playwright.expect(local.locator(".trust .badge")).to_have_text("trusted")
        playwright.expect(page.locator('#leaders-volunteers tr[data-volunteer="local"] td').nth(2)).to_have_text("12")  # tasks
        playwright.expect(page.locator('#leaders-workers tr[data-leader="stranger"]')).to_have_count(0)

        stranger.locator("button[data-unban]").click()
        playwright.expect(stranger.locator(".trust .badge")).to_have_text("ok", timeout=10_000)
        page.once("dialog", lambda dialog: dialog.accept())  # "Ban worker stranger? ..."
        stranger.locator("button[data-ban]").click()
        playwright.expect(stranger.locator(".trust .badge")).to_have_text("banned", timeout=10_000)
        playwright.expect(page.locator("#events")).to_contain_text("worker stranger banned by the operator")
