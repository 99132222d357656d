"""What people click, in headless Chromium (Debian's /usr/bin/chromium driven by playwright): the login pages,
the spawn progress page, and JupyterLab with the sPyNNaker kernel in its launcher. Screenshots are kept in
tests/artifacts/."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from oidc_fixtures import ebrains_auth, hub_with_ebrains

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (make test-deps does)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_local_login_to_jupyterlab_with_the_spynnaker_kernel(browser, hub_factory):
    hub = hub_factory()
    password = hub.add_user("dora")
    page = browser.new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", "dora")
    page.fill("input[name=password]", password)
    shot(page, "local-login")
    page.click("input[type=submit], button[type=submit]")
    # Spawn progress in words, then JupyterLab's launcher with the sPyNNaker kernel.
    page.wait_for_url("**/user/dora/lab**", timeout=120_000)
    page.get_by_text("sPyNNaker", exact=True).first.wait_for(timeout=120_000)
    shot(page, "local-jupyterlab-launcher")
    page.close()


def test_wrong_password_is_said_plainly(browser, hub_factory):
    hub = hub_factory()
    hub.add_user("eve")
    page = browser.new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("input[name=username]", "eve")
    page.fill("input[name=password]", "not-the-password")
    page.click("input[type=submit], button[type=submit]")
    page.get_by_text("Invalid username or password").wait_for(timeout=30_000)
    shot(page, "local-login-refused")
    page.close()


def test_ebrains_login_through_the_provider_to_jupyterlab(browser, hub_factory, oidc_provider):
    hub = hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {"auth": ebrains_auth(oidc_provider, allowed_groups=["spinnaker-users"])},
    )
    oidc_provider.add_user("browser-user", "pw-browser-1", roles={"group": ["spinnaker-users"], "team": []})
    page = browser.new_page()
    page.goto(f"{hub.url}/hub/")
    page.get_by_text("Sign in with EBRAINS").click()
    try:
        page.locator("input[name=password]").wait_for(timeout=30_000)
    finally:
        shot(page, "ebrains-after-sign-in-click")
    page.fill("input[name=username]", "browser-user")
    page.fill("input[name=password]", "pw-browser-1")
    shot(page, "ebrains-provider-login")
    page.click("button[type=submit], input[type=submit]")
    consent = page.locator("button:has-text('Allow'), input[value='Allow']")
    if consent.count():
        consent.first.click()
    page.wait_for_url(f"{hub.url}/**", timeout=30_000)
    page.goto(f"{hub.url}/hub/spawn")
    page.wait_for_url("**/user/browser-user/lab**", timeout=120_000)
    page.get_by_text("sPyNNaker", exact=True).first.wait_for(timeout=120_000)
    shot(page, "ebrains-jupyterlab")
    page.close()
