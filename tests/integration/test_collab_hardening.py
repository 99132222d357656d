"""Collab membership is read after the login too (auth.ebrains.membership_check_interval, refresh_pre_spawn,
auth_refresh_age): someone removed from the admitted collab is refused a new server at once, their running server
stops at the next periodic check, and a lost admin collab drops admin rights. The tests' OpenID Connect provider
changes a user's `roles.team` mid-test (its admin API replaces the user; userinfo answers with the new claims)."""

from __future__ import annotations

import time

import pytest
import requests

from hubclient import HubClient, wait_for
from oidc_fixtures import ebrains_auth, hub_with_ebrains

CONTACT = "collab-help@example.org"
COURSE, OPS = "collab-spinnaker-course-viewer", "collab-spinnaker-ops-editor"
CHECK_INTERVAL = 2


@pytest.fixture(scope="module")
def hub(hub_factory, oidc_provider):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {
            "culler": {"enabled": False},
            "auth": ebrains_auth(
                oidc_provider,
                allowed_collabs={"spinnaker-course": "viewer"},
                admin_collabs={"spinnaker-ops": "editor"},
                membership_check_interval=CHECK_INTERVAL,
                auth_refresh_age=2,
                contact=CONTACT,
            ),
        },
    )


def member(hub, provider, name: str, team: list[str]) -> HubClient:
    provider.add_user(name, f"pw-{name}-1", roles={"group": [], "team": team})
    session = requests.Session()
    final = provider.login_with_requests(session, f"{hub.url}/hub/oauth_login?next=/hub/home", name, f"pw-{name}-1")
    assert final.status_code == 200, (final.status_code, final.text[:300])
    return HubClient(hub.url, None, session=session)


def set_team(provider, name: str, team: list[str]) -> None:
    provider.add_user(name, f"pw-{name}-1", roles={"group": [], "team": team})  # same user, new claims


def test_removed_from_the_collab_the_running_server_stops_without_a_request(hub, oidc_provider):
    watcher = member(hub, oidc_provider, "watcher", [OPS])  # an admin, to look at leaver's server
    leaver = member(hub, oidc_provider, "leaver", [COURSE])
    leaver.start_server()
    set_team(oidc_provider, "leaver", [])
    t0 = time.monotonic()
    wait_for(
        lambda: watcher.api("GET", "/users/leaver").json()["servers"] == {},
        10 * CHECK_INTERVAL + 30,
        "leaver's server to be stopped by the membership check",
    )
    print(f"leaver's server stopped {time.monotonic() - t0:.1f} s after the removal (check every {CHECK_INTERVAL} s)")


def test_removed_from_the_collab_a_new_server_is_refused_in_one_line(hub, oidc_provider):
    late = member(hub, oidc_provider, "late-leaver", [COURSE])
    set_team(oidc_provider, "late-leaver", [])
    r = late.api("POST", f"/users/{late.name}/server")  # the spawn reads the membership again
    assert r.status_code == 403, (r.status_code, r.text[:300])
    assert "not in the groups allowed" in r.json()["message"] and CONTACT in r.json()["message"], r.text


def test_losing_the_admin_collab_drops_admin_rights_without_a_new_login(hub, oidc_provider):
    ops = member(hub, oidc_provider, "ops-leaver2", [OPS, COURSE])
    assert ops.api("GET", "/users").status_code == 200
    set_team(oidc_provider, "ops-leaver2", [COURSE])
    wait_for(lambda: ops.api("GET", "/users").status_code == 403, 30, "ops-leaver2's admin rights to go")
    assert ops.api("GET", "/user").status_code == 200  # still a member of the course: still in
