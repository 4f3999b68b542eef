"""Why a worker paused, in a real headless Chromium: on the foreman's dashboard and on the worker's own."""

from __future__ import annotations

import pytest

from foreman import Foreman
from owner import Owner, running_worker

pytestmark = pytest.mark.slow  # a real headless browser

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect


def test_both_dashboards_show_a_pause_and_its_reason_then_the_resume(browser_page) -> None:
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    owner = Owner()
    with (Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm,
          running_worker(fm.address, "laptop", owner, dashboard=True) as laptop):
        fm.wait_for_workers(1)
        page.goto(fm.dashboard_url)
        row = page.locator('tr[data-worker="laptop"]')
        expect(row.locator(".pill")).to_have_text("idle", timeout=10_000)
        expect(row.locator(".pause-reason")).to_have_count(0)

        owner.busy = True
        expect(row.locator(".pill")).to_have_text("paused", timeout=10_000)
        expect(row.locator(".pause-reason")).to_contain_text("the owner's CPU use is 90% (pause above 50%")
        expect(page.locator("#events")).to_contain_text("worker laptop paused: the owner's CPU use is 90%")

        assert laptop.dashboard is not None
        page.goto(laptop.dashboard.url)
        expect(page.locator("#status")).to_have_text("paused", timeout=10_000)
        expect(page.locator("#pause-reason")).to_have_text(
            "paused: the owner's CPU use is 90% (pause above 50%, resume below 25%)")

        owner.busy = False
        expect(page.locator("#status")).to_have_text("idle", timeout=10_000)
        expect(page.locator("#pause-reason")).to_have_text("")
    assert errors == []
