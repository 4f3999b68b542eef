"""The worker dashboard in a real headless Chromium: live numbers move, Restart reconnects the worker."""

from __future__ import annotations

import re
import threading

import pytest

from conftest import stop_process
from foreman import Foreman
from foreman.addresses import split_token
from tasks import sleep_then
from test_worker_dashboard import FAST, dashboard_worker

pytestmark = pytest.mark.slow  # a real headless browser

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect


def test_live_numbers_update_and_restart_reconnects_the_worker(browser_page) -> None:
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with Foreman(port=0, dashboard=False, **FAST) as fm:
        process, api = dashboard_worker(fm.address)
        try:
            fm.wait_for_workers(1)
            page.goto(str(api.base_url) + "/")
            expect(page.locator("#worker-id")).to_have_text(fm.workers[0])
            expect(page.locator("#live")).to_have_text("live", timeout=10_000)
            expect(page.locator("#status")).to_have_text("idle", timeout=10_000)
            expect(page.locator("#foreman")).to_have_text(split_token(fm.address)[0])  # never the token
            expect(page.locator("#gpu-detail")).not_to_have_text("–")  # GPUs, or a plain "no GPU"

            uptime = page.locator("#uptime").inner_text()
            expect(page.locator("#uptime")).not_to_have_text(uptime, timeout=5_000)
            assert page.locator("#tasks_completed").inner_text() == "0"
            results = fm.map(sleep_then, [0.05] * 20, chunksize=1)
            assert results == [0.05] * 20
            expect(page.locator("#tasks_completed")).to_have_text("20", timeout=5_000)
            expect(page.locator("#batches tr")).to_have_count(15)  # the latest batches, newest first
            expect(page.locator("#chart-cpu polyline")).to_have_count(1, timeout=5_000)

            job = fm.imap(sleep_then, [0.3] * 12, chunksize=1)
            consumer = threading.Thread(target=lambda: results.extend(job))
            consumer.start()
            expect(page.locator("#current tr")).to_have_count(2, timeout=5_000)  # both task processes busy
            page.once("dialog", lambda dialog: dialog.accept())  # "Restart this worker? ..."
            page.locator("#restart").click()
            expect(page.locator("#notice")).to_have_text(re.compile("^Restarted: reconnected"), timeout=15_000)
            expect(page.locator("#reconnects")).to_have_text("1")
            expect(page.locator("#connection")).to_have_text(re.compile("^connected since"))
            consumer.join(timeout=30)
            assert results[20:] == [0.3] * 12  # the tasks it was running went back to the foreman and ran again
            assert fm.workers == [page.locator("#worker-id").inner_text()]
            assert errors == []
        finally:
            api.close()
            stop_process(process)
