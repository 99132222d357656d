"""The Jobs page (the Job Manager) in headless Chromium: behind the hub's login (HubOAuth), linked from the hub's home
page; a bad hardware config is said before anything is queued; an inline script is followed to `finished` with its
live log and its output file opens; another user sees none of it."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading

import pytest

from conftest import free_port
from test_browser import browser, shot  # noqa: F401 - browser: the module's Chromium fixture
from test_jobs import start_jobs_hub

pytestmark = pytest.mark.browser

SCRIPT = """import time
print("counting", flush=True)
time.sleep(1)
open("result.txt", "w").write("answer 42\\n")
print("wrote result.txt", flush=True)
"""


@pytest.fixture(scope="module")
def page_hub(hub_factory):
    hub = start_jobs_hub(hub_factory)
    hub.passwords = {name: hub.add_user(name) for name in ("jpia", "jquin", "jrho")}
    return hub


def login(browser, hub, name):
    """A fresh browser (own cookies) that opens the Jobs page and is sent through the hub's login."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{hub.url}/services/jobs/")
    page.wait_for_url("**/hub/login**", timeout=60_000)
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", hub.passwords[name])
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(re.compile(r".*/services/jobs/?$"), timeout=60_000)
    page.get_by_role("heading", name="My jobs").wait_for(timeout=30_000)
    return context, page


def test_submit_follow_and_download_then_another_user_sees_nothing(browser, page_hub):
    hub = page_hub
    context, page = login(browser, hub, "jpia")
    try:
        page.get_by_text("You have no jobs yet.").wait_for()
        # The hub's home page links here.
        page.goto(f"{hub.url}/hub/home")
        page.locator("#jobs-link a").click()
        page.get_by_role("heading", name="My jobs").wait_for(timeout=30_000)

        page.get_by_role("link", name="New job").first.click()
        page.fill("#code", SCRIPT)
        page.fill("#tags", "browser, first")
        # Not JSON: said in the page, nothing submitted, nothing typed lost.
        page.fill("#hardware_config", '{"time_limit": 60,')
        page.click("#submit")
        assert page.locator("#error").is_visible()
        assert "Hardware config: not valid JSON" in page.locator("#error").inner_text()
        assert page.url.endswith("/services/jobs/new")
        # JSON, but a key the service does not know: the service says which, the form keeps what was typed.
        page.fill("#hardware_config", '{"colour": "blue"}')
        page.click("#submit")
        page.locator("#error").wait_for(state="visible")
        said = page.locator("#error").inner_text()
        assert "colour" in said, said
        assert page.input_value("#code") == SCRIPT
        shot(page, "jobs-page-bad-config")

        page.fill("#hardware_config", '{"time_limit": 60}')
        page.click("#submit")
        page.wait_for_url(re.compile(r".*/services/jobs/jobs/\d+$"), timeout=30_000)
        job_url = page.url
        job_id = job_url.rsplit("/", 1)[1]
        # Live log, then `finished` (the page follows on its own) with the output file, its size and sha256.
        page.locator("#log", has_text="counting").wait_for(timeout=90_000)
        page.locator("#status", has_text="finished").wait_for(timeout=90_000)
        page.locator("#files").wait_for(timeout=30_000)
        assert "wrote result.txt" in page.locator("#log").inner_text()
        expected = b"answer 42\n"
        row = page.locator("#files tr", has_text="result.txt")
        assert str(len(expected)) in row.inner_text() and hashlib.sha256(expected).hexdigest() in row.inner_text()
        assert page.locator("#provenance").inner_text().strip().startswith("{")
        shot(page, "jobs-page-finished")
        href = page.locator("a.output", has_text="result.txt").get_attribute("href")
        opened = page.goto(href)
        assert opened.status == 200 and opened.body() == expected
        # The list shows it with its status.
        page.goto(f"{hub.url}/services/jobs/")
        assert "finished" in page.locator("#jobs tr", has_text=job_id).first.inner_text()
    finally:
        context.close()

    other, page = login(browser, hub, "jquin")
    try:
        page.get_by_text("You have no jobs yet.").wait_for()
        response = page.goto(job_url)
        assert response.status == 404
        assert "Either there is no job with id" in page.content()
        assert "counting" not in page.content()
        shot(page, "jobs-page-other-user")
    finally:
        other.close()


@pytest.fixture
def held_input():
    """A loopback URL whose answer waits until the test lets it go: a job downloading it is claimed by the runner
    but its command has not started."""
    go = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            go.wait(120)
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"42\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/input.txt", go
    finally:
        go.set()
        server.shutdown()
        server.server_close()


def test_a_job_whose_command_has_not_started_stays_submitted_on_its_live_page(browser, page_hub, held_input):
    """The page's live status says what nmpi says: "submitted" while the claimed job still downloads its input
    (public_status), "running" only once its command runs."""
    url, go = held_input
    context, page = login(browser, page_hub, "jrho")
    try:
        page.goto(f"{page_hub.url}/services/jobs/new")
        page.fill("#code", "print('input:', open('input.txt').read())\n")
        page.fill("#input_data", url)
        page.click("#submit")
        page.wait_for_url(re.compile(r".*/services/jobs/jobs/\d+$"), timeout=30_000)
        page.locator("#log", has_text="Input data: downloading").wait_for(timeout=60_000)
        # Two polls after the download began: the first one's answer has been shown by the time the second is asked.
        for _ in range(2):
            with page.expect_response(lambda r: "/log?offset=" in r.url, timeout=30_000) as polled:
                pass
            assert polled.value.json()["status"] == "submitted"
        assert page.locator("#status").inner_text() == "submitted"
        shot(page, "jobs-page-submitted-while-downloading")
        go.set()
        page.locator("#status", has_text="finished").wait_for(timeout=90_000)
        assert "input: 42" in page.locator("#log").inner_text()
    finally:
        context.close()


def test_the_nmpi_api_stays_at_the_root_of_its_own_address(page_hub):
    import requests

    r = requests.get(page_hub.jobs_url + "/", timeout=10)
    assert r.status_code == 200 and r.json()["version"] == "3"
    r = requests.post(page_hub.jobs_url + "/jobs/", json={}, timeout=10)  # no token, no cookie: refused as before
    assert r.status_code == 401


def test_jupyterlab_has_a_launcher_tile_for_the_jobs_page(page_hub):
    """jupyter-server-proxy's entry `batch-jobs` (the hub package's entry point): a launcher tile in JupyterLab that
    opens the Jobs page."""
    user = page_hub.client("jquin", page_hub.passwords["jquin"])
    user.start_server()
    try:
        info = user.server("GET", "server-proxy/servers-info")
        assert info.status_code == 200, info.text
        entry = next(s for s in info.json()["server_processes"] if s["name"] == "batch-jobs")
        assert entry["launcher_entry"]["enabled"] and entry["launcher_entry"]["title"] == "Batch jobs"
        assert entry["new_browser_tab"]
        r = user.server("GET", "batch-jobs/")
        assert r.status_code == 200 and 'content="0; url=/services/jobs/"' in r.text, (r.status_code, r.text)
    finally:
        user.stop_server()
