"""Admission and admin rights by EBRAINS collab (auth.ebrains.allowed_collabs / admin_collabs), read from the
`roles.team` claim (collab-<collab>-<role>) of the tests' OpenID Connect provider, through the real hub."""

from __future__ import annotations

import pytest
import requests
import yaml

from oidc_fixtures import ebrains_auth, hub_with_ebrains

CONTACT = "collab-help@example.org"


def collab_hub(hub_factory, oidc_provider, course_role: str):
    return hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {
            "auth": ebrains_auth(
                oidc_provider,
                allowed_collabs={"spinnaker-course": course_role},
                admin_collabs={"spinnaker-ops": "editor"},
                contact=CONTACT,
            ),
        },
    )


@pytest.fixture(scope="module")
def viewer_hub(hub_factory, oidc_provider):
    """Viewers of spinnaker-course are admitted."""
    return collab_hub(hub_factory, oidc_provider, "viewer")


@pytest.fixture(scope="module")
def editor_hub(hub_factory, oidc_provider):
    """Only editors (or administrators) of spinnaker-course are admitted."""
    return collab_hub(hub_factory, oidc_provider, "editor")


def log_in(hub, provider, username: str, team: list[str]) -> tuple[requests.Session, requests.Response]:
    password = f"pw-{username}-1"
    provider.add_user(username, password, roles={"group": [], "team": team})
    session = requests.Session()
    final = provider.login_with_requests(session, f"{hub.url}/hub/oauth_login?next=/hub/home", username, password)
    return session, final


def me(hub, session) -> dict:
    return session.get(
        f"{hub.url}/hub/api/user", headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")}
    ).json()


def is_admin(hub, session) -> bool:
    r = session.get(f"{hub.url}/hub/api/users", headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")})
    return r.status_code == 200


def test_a_viewer_is_admitted_where_viewer_suffices(viewer_hub, oidc_provider):
    session, final = log_in(viewer_hub, oidc_provider, "course-viewer-a", ["collab-spinnaker-course-viewer"])
    assert final.status_code == 200 and final.url.endswith("/hub/home"), (final.status_code, final.text[:300])
    user = me(viewer_hub, session)
    assert "collab-spinnaker-course-viewer" in user["groups"], user
    assert not is_admin(viewer_hub, session)


def test_a_viewer_is_refused_where_editor_is_required(editor_hub, oidc_provider):
    _, final = log_in(editor_hub, oidc_provider, "course-viewer-b", ["collab-spinnaker-course-viewer"])
    assert final.status_code == 403, (final.status_code, final.url)
    assert "not in the groups allowed" in final.text and CONTACT in final.text


def test_a_higher_role_satisfies_a_lower_requirement(editor_hub, oidc_provider):
    session, final = log_in(editor_hub, oidc_provider, "course-admin", ["collab-spinnaker-course-administrator"])
    assert final.status_code == 200, (final.status_code, final.text[:300])
    groups = set(me(editor_hub, session)["groups"])
    assert {
        "collab-spinnaker-course-viewer",
        "collab-spinnaker-course-editor",
        "collab-spinnaker-course-administrator",
    } <= groups, groups


def test_a_collab_whose_name_only_starts_alike_admits_nobody(viewer_hub, oidc_provider):
    # collab-spinnaker-course-extra-viewer is a viewer of "spinnaker-course-extra", not of "spinnaker-course";
    # collab-spinnaker-viewer-x is not a role entry at all.
    _, final = log_in(
        viewer_hub,
        oidc_provider,
        "lookalike",
        ["collab-spinnaker-course-extra-viewer", "collab-spinnaker-course-owner", "spinnaker-course"],
    )
    assert final.status_code == 403, (final.status_code, final.url)


def test_admin_rights_by_collab_role(editor_hub, oidc_provider):
    session, final = log_in(editor_hub, oidc_provider, "ops-editor", ["collab-spinnaker-ops-editor"])
    assert final.status_code == 200, (final.status_code, final.text[:300])  # admins are admitted
    assert is_admin(editor_hub, session)
    # A viewer of the admins' collab (and editor of the course) gets in, but not as an admin.
    session, final = log_in(
        editor_hub, oidc_provider, "ops-viewer", ["collab-spinnaker-ops-viewer", "collab-spinnaker-course-editor"]
    )
    assert final.status_code == 200
    assert not is_admin(editor_hub, session)


def test_losing_the_role_loses_admin_rights_at_the_next_login(editor_hub, oidc_provider):
    session, _ = log_in(
        editor_hub,
        oidc_provider,
        "ops-leaver",
        ["collab-spinnaker-ops-administrator", "collab-spinnaker-course-editor"],
    )
    assert is_admin(editor_hub, session)
    session, final = log_in(editor_hub, oidc_provider, "ops-leaver", ["collab-spinnaker-course-editor"])
    assert final.status_code == 200
    assert not is_admin(editor_hub, session)


# --- the config: one clear line for what cannot be meant ----------------------------------------------------------


def load(tmp_path, ebrains: dict):
    from spinnaker_jupyter import config

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data_dir": str(tmp_path / "data"), "auth": {"type": "ebrains", "ebrains": {"client_id": "x", **ebrains}}}
        )
    )
    return config.load([path])


@pytest.fixture
def client_secret(monkeypatch):
    monkeypatch.setenv("EBRAINS_CLIENT_SECRET", "s" * 32)


def test_collabs_alone_admit_someone(tmp_path, client_secret):
    d = load(tmp_path, {"allowed_collabs": {"spinnaker-course": "viewer"}})
    assert d["auth"]["ebrains"]["allowed_collabs"] == {"spinnaker-course": "viewer"}


@pytest.mark.parametrize(
    "ebrains, expected",
    [
        (
            {"allowed_collabs": {"spinnaker-course": "member"}},
            "auth.ebrains.allowed_collabs.spinnaker-course: expected one of 'viewer', 'editor', 'administrator', got "
            "'member'",
        ),
        (
            {"admin_collabs": {"collab-spinnaker-ops-editor": "editor"}},
            "auth.ebrains.admin_collabs: 'collab-spinnaker-ops-editor' looks like a roles.team entry; give the collab's "
            "name and the role it needs, e.g. spinnaker-ops: editor",
        ),
    ],
)
def test_a_collab_setting_that_cannot_be_meant_is_one_line(tmp_path, client_secret, ebrains, expected):
    from spinnaker_jupyter.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load(tmp_path, ebrains)
    assert str(e.value).splitlines()[0].startswith(expected), str(e.value)


def test_malformed_team_claims_give_no_membership():
    from spinnaker_jupyter import collabs

    assert collabs.groups_for(None, {"x"}) == set()
    assert collabs.groups_for("collab-x-viewer", {"x"}) == set()  # a string, not a list
    assert collabs.groups_for([None, 3, "collab--viewer", "collab-x-", "collab-x-viewer"], {"x"}) == {"collab-x-viewer"}
    assert collabs.memberships(["collab-a-b-editor", "collab-a-b-viewer"]) == {"a-b": "editor"}
