"""EBRAINS login against a real OpenID Connect provider (tests/oidc), through the real hub: who gets in, safe
names, the token reaching notebooks (spinnman's own lookup), clear pages when things go wrong."""

from __future__ import annotations

import textwrap

import pytest
import requests

from conftest import free_port
from hubclient import HubClient, wait_for
from oidc_fixtures import ebrains_auth, hub_with_ebrains

GROUP = "spinnaker-users"


@pytest.fixture(scope="module")
def ebrains_hub(hub_factory, oidc_provider):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {
            "auth": ebrains_auth(
                oidc_provider,
                allowed_groups=[GROUP],
                admin_groups=["spinnaker-admins"],
                contact="spinnaker-support@example.org",
                refresh_margin=3,
                auth_refresh_age=1,
            ),
            "hub": {"frame_ancestors": ["https://wiki.ebrains.eu"]},
        },
    )


def login(hub, provider, username, password) -> tuple[requests.Session, requests.Response]:
    session = requests.Session()
    final = provider.login_with_requests(session, f"{hub.url}/hub/oauth_login?next=/hub/home", username, password)
    return session, final


def test_member_of_allowed_group_logs_in_and_gets_a_fresh_token_in_the_kernel(ebrains_hub, oidc_provider):
    oidc_provider.add_user(
        "Neuro.Scientist", "pw-neuro-1", roles={"group": [GROUP], "team": []}, email="ns@example.org"
    )
    session, final = login(ebrains_hub, oidc_provider, "Neuro.Scientist", "pw-neuro-1")
    assert final.status_code == 200 and final.url.endswith("/hub/home"), (final.status_code, final.url)
    user = HubClient(ebrains_hub.url, None, session=session)
    assert user.logged_in and user.name.startswith("neuro.scientist--"), user.name
    user.start_server()
    kernel = user.start_kernel("spynnaker")
    lookup = textwrap.dedent("""
        from spinnman.spalloc import spalloc_allocator as m
        print("TOKEN", getattr(m, "__bearer_token")())
    """)
    first = user.execute(kernel, lookup)["stdout"].split("TOKEN", 1)[1].strip()
    assert oidc_provider.token_is_valid(first), "spinnman got no valid EBRAINS access token"
    # Tokens live 8 s at this provider: later lookups still get a valid (refreshed) one.
    second = wait_for(
        lambda: (lambda t: t if t != first else None)(
            user.execute(kernel, lookup)["stdout"].split("TOKEN", 1)[1].strip()
        ),
        30,
        "a refreshed token",
        interval=1,
    )
    assert oidc_provider.token_is_valid(second)
    user.stop_server()


def test_outsider_gets_a_clear_403(ebrains_hub, oidc_provider):
    oidc_provider.add_user("outsider", "pw-outsider-1", roles={"group": ["other-lab"], "team": []})
    _, final = login(ebrains_hub, oidc_provider, "outsider", "pw-outsider-1")
    assert final.status_code == 403
    assert "not in the groups allowed" in final.text and "spinnaker-support@example.org" in final.text


def test_admin_group_makes_admins(ebrains_hub, oidc_provider):
    oidc_provider.add_user("lab-head", "pw-head-123", roles={"group": ["spinnaker-admins"], "team": []})
    session, final = login(ebrains_hub, oidc_provider, "lab-head", "pw-head-123")
    assert final.status_code == 200
    admin = HubClient(ebrains_hub.url, None, session=session)
    assert admin.api("GET", "/users").status_code == 200  # admins may list users


def test_unusual_names_are_made_safe_without_collisions(ebrains_hub, oidc_provider):
    names = set()
    for i, raw in enumerate(["Ünïcode Üser", "unicode user", "../../etc"]):
        oidc_provider.add_user(raw, f"pw-odd-{i}-xyz", roles={"group": [GROUP], "team": []})
        session, final = login(ebrains_hub, oidc_provider, raw, f"pw-odd-{i}-xyz")
        assert final.status_code == 200, (raw, final.status_code, final.text[:300])
        me = session.get(
            f"{ebrains_hub.url}/hub/api/user", headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")}
        ).json()["name"]
        assert all(ch.isalnum() or ch in "._-" for ch in me) and "/" not in me and not me.startswith("."), me
        names.add(me)
    assert len(names) == 3, names


def test_hub_can_be_framed_by_the_collab(ebrains_hub):
    csp = requests.get(f"{ebrains_hub.url}/hub/login").headers["Content-Security-Policy"]
    assert "frame-ancestors 'self' https://wiki.ebrains.eu" in csp


def test_unreachable_provider_gives_a_clear_page(hub_factory, oidc_provider):
    dead = f"http://127.0.0.1:{free_port()}"
    hub = hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {"auth": ebrains_auth(oidc_provider, token_url=dead + "/token", userinfo_url=dead + "/me", allow_all=True)},
    )
    oidc_provider.add_user("someone", "pw-someone-1", roles={"group": [], "team": []})
    _, final = login(hub, oidc_provider, "someone", "pw-someone-1")
    assert final.status_code == 503 and "cannot be reached right now" in final.text, (
        final.status_code,
        final.text[:500],
    )


def test_revoked_refresh_token_means_log_in_again_and_nothing_is_lost(ebrains_hub, oidc_provider):
    oidc_provider.add_user("revokee", "pw-revokee-1", roles={"group": [GROUP], "team": []})
    session, _ = login(ebrains_hub, oidc_provider, "revokee", "pw-revokee-1")
    user = HubClient(ebrains_hub.url, None, session=session)
    user.start_server()
    assert user.server(
        "PUT", "api/contents/notes.txt", json={"type": "file", "format": "text", "content": "keep me"}
    ).status_code in (200, 201)
    oidc_provider.revoke("revokee", refresh_tokens=True, access_tokens=True)
    svc = f"{ebrains_hub.url}/services/access-token-service/access-token"
    seen = []

    def refused():
        r = requests.get(svc, headers={"Authorization": f"token {user.token}"}, timeout=30)
        seen.append((r.status_code, r.text[:200]))
        return [r] if r.status_code == 503 else None  # a list: a 5xx Response itself is falsy

    try:
        [r] = wait_for(refused, 40, "the token service to ask for a new login", interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}; last answers: {seen[-3:]}") from None
    assert "log in again" in r.text.lower() or "login_required" in r.text
    # Logging in again restores a token, and the server and files were never touched.
    session, final = login(ebrains_hub, oidc_provider, "revokee", "pw-revokee-1")
    assert final.status_code == 200
    again = HubClient(ebrains_hub.url, None, session=session)
    assert again.server("GET", "api/contents/notes.txt").json()["content"] == "keep me"
    r = requests.get(svc, headers={"Authorization": f"token {again.token}"}, timeout=30)
    assert r.status_code == 200 and oidc_provider.token_is_valid(r.json()["access_token"])
    again.stop_server()
