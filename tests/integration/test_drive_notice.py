"""The notice in JupyterLab when the user's EBRAINS Drive is not mounted (spinnaker_jupyter_ext/notice.py): seen in
headless Chromium through the real hub with EBRAINS login, the Drive double answering 502."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doubles.drive_server import DriveDouble
from oidc_fixtures import hub_with_ebrains
from test_browser import browser, shot  # noqa: F401 (the Chromium fixture)
from test_drive import drive_deployment, home, login

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def drive_down(oidc_provider):
    with DriveDouble(userinfo_url=oidc_provider.userinfo_url) as d:
        d.down = True  # every request answers 502: the keeper never gets as far as rclone
        yield d


@pytest.fixture(scope="module")
def hub(hub_factory, oidc_provider, drive_down):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        drive_deployment(oidc_provider, drive_down.url),
    )


def test_jupyterlab_says_why_the_drive_is_not_mounted(browser, hub, oidc_provider):  # noqa: F811
    user = login(hub, oidc_provider, "noticeuser")
    user.start_server()
    try:
        context = browser.new_context()
        context.add_cookies(
            [
                {"name": c.name, "value": c.value, "domain": "127.0.0.1", "path": c.path or "/"}
                for c in user.session.cookies
            ]
        )
        page = context.new_page()
        page.goto(f"{hub.url}/user/{user.name}/lab")
        notice = page.get_by_text("EBRAINS Drive not mounted at ~/drive")
        try:
            notice.first.wait_for(timeout=90_000)
        finally:
            shot(page, "drive-notice")
        text = notice.first.inner_text()
        assert "answered HTTP 502" in text, text
        context.close()
        settings = home(hub, user) / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension"
        assert '"fetchNews": "false"' in (settings / "notification.jupyterlab-settings").read_text()
    finally:
        user.stop_server()


def test_the_notice_words_and_what_is_never_touched(tmp_path):
    from spinnaker_jupyter_ext.notice import NOTIFICATION_SETTINGS, answer_news_question, drive_notice

    assert drive_notice({"state": "mounted", "mount_point": "/h/drive"}) is None
    assert drive_notice(None) is None
    said = drive_notice(
        {"state": "refused", "reason": "EBRAINS Drive refused your login (HTTP 401)", "mount_point": "/home/u/drive"}
    )
    assert said.startswith("EBRAINS Drive not mounted at ~/drive: EBRAINS Drive refused your login (HTTP 401).")
    mine = tmp_path / NOTIFICATION_SETTINGS
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps({"fetchNews": "true"}))
    assert answer_news_question(tmp_path) is False and json.loads(mine.read_text()) == {"fetchNews": "true"}
    fresh = Path(tmp_path / "other")
    assert answer_news_question(fresh) is True and '"fetchNews": "false"' in (fresh / NOTIFICATION_SETTINGS).read_text()
