"""The dashboard in a real browser (Playwright driving Debian's chromium)
against a real server with the control plane's loops running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gpuscout.providers.fake import FakeProvider
from gpuscout.server import ServerThread
from tests.api_fixtures import (
    AUTH,
    G4_SPOT_B,
    P3_SPOT_A,
    GatedAgents,
    address_for,
    close_service,
    make_service,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/gpuscout-dashboard.png")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    service = make_service(tmp_path / "home", f"sqlite:///{tmp_path / 'db.sqlite'}",
                           FakeProvider(address_for=address_for), GatedAgents(),
                           reconcile_interval_s=0.05)
    running = ServerThread(service, start_plane=True)
    try:
        yield running.start()
    finally:
        running.stop()
        close_service(service)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "apt-get install -y chromium (make test-deps does)"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    yield context.new_page()
    context.close()


def test_the_dashboard_lists_a_job_and_follows_its_migration(server: ServerThread,
                                                               page: Page) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=5) as api:
        # Start the job on p3.2xlarge spot by taking g4dn spot capacity away.
        for offer in api.get("/api/v1/offers").json()["data"]:
            if offer["instance_type"] == "g4dn.xlarge" and offer["capacity"] == "spot":
                api.patch(f"/api/v1/offers/{offer['id']}", json={"available": False})
        job = api.post("/api/v1/jobs", json={
            "name": "dashboard-job", "command": "python train.py",
            "resources": {"gpus": 1}, "budget_usd": 5}).json()

        page.goto(server.url + "/")
        row = page.locator(f'#jobs tr[data-job-id="{job["id"]}"]')
        expect(row).to_contain_text("dashboard-job")
        expect(row.locator(".badge")).to_have_text("running", timeout=10_000)
        expect(row).to_contain_text("p3.2xlarge spot (us-east-1a)")
        expect(page.locator("#offers tbody tr")).to_have_count(
            api.get("/api/v1/offers").json()["count"])

        row.click()
        expect(page.locator("#job-title")).to_contain_text("dashboard-job")
        expect(page.locator("#events")).to_contain_text("submitted")
        expect(page.locator("#migrations-empty")).to_be_visible()

        api.patch(f"/api/v1/offers/{G4_SPOT_B}", json={"available": True})
        moved = api.post(f"/api/v1/jobs/{job['id']}/migrate", json={"offer_id": G4_SPOT_B,
                                                                   "confirm_dearer": True})
        assert moved.status_code == 202, moved.text
        migration = page.locator("#migrations tbody tr").first
        expect(migration).to_contain_text("completed", timeout=10_000)
        expect(migration).to_contain_text("manual")
        expect(migration).to_contain_text("g4dn.xlarge spot (us-east-1b)")
        done = api.get(f"/api/v1/jobs/{job['id']}/migrations").json()["data"][0]
        expect(migration).to_contain_text(str(done["resume_step"]))
        expect(row).to_contain_text("g4dn.xlarge spot (us-east-1b)")
        assert P3_SPOT_A == done["from_offer_id"]

    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
