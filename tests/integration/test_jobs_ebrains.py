"""The job service on an EBRAINS-login deployment: the unmodified nmpi client with an EBRAINS access token, checked
at the identity provider's userinfo (tests/oidc stands in for EBRAINS IAM), as on the EBRAINS platform; collabs
from groups (jobs.collabs) and from the token's roles.team; a user outside the allowed groups is refused."""

from __future__ import annotations

import importlib

import pytest
import requests

from conftest import free_port
from hubclient import HubClient, wait_for
from oidc_fixtures import ebrains_auth, hub_with_ebrains, start_oidc_provider

GROUP = "spinnaker-users"


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    with start_oidc_provider(tmp_path_factory.mktemp("oidc-jobs"), access_token_ttl=600) as p:
        yield p


@pytest.fixture(scope="module")
def nmpi_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp_path_factory.mktemp("nmpi-home")))
    import nmpi.nmpi_user

    yield importlib.reload(nmpi.nmpi_user)
    mp.undo()


@pytest.fixture(scope="module")
def hub(hub_factory, provider):
    port = free_port()
    hub = hub_with_ebrains(
        hub_factory,
        provider,
        {
            "auth": ebrains_auth(provider, allowed_groups=[GROUP], contact="spinnaker-support@example.org"),
            "jobs": {
                "enabled": True,
                "port": port,
                "token_cache_seconds": 0,
                "collabs": {"course-a": ["course-a-students"]},
            },
        },
    )
    hub.jobs_url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(hub.jobs_url + "/", timeout=2).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    wait_for(up, 60, "the job service to answer")
    return hub


def ebrains_token(hub, provider, name: str, password: str, **claims) -> str:
    """Log in to the hub through the provider, then take the user's EBRAINS access token from the hub's
    access-token-service (as a notebook does)."""
    provider.add_user(name, password, **claims)
    session = requests.Session()
    provider.login_with_requests(session, f"{hub.url}/hub/oauth_login?next=/hub/home", name, password)
    user = HubClient(hub.url, None, session=session)
    r = requests.get(
        f"{hub.url}/services/access-token-service/access-token",
        headers={"Authorization": f"token {user.token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def test_ebrains_token_submits_to_own_group_and_team_collabs(hub, provider, nmpi_module, tmp_path):
    token = ebrains_token(
        hub,
        provider,
        "neuro",
        "pw-neuro-12",
        roles={"group": [GROUP, "course-a-students"], "team": ["collab-lab-x-editor"]},
    )
    # exactly as on EBRAINS: the client checks the token at the provider's userinfo, the service too
    client = nmpi_module.Client(token=token, job_service=hub.jobs_url, user_info_endpoint=provider.userinfo_url)
    assert client.username == "neuro"
    uris = [
        client.submit_job(
            source="open('o.txt', 'w').write('from ' + __import__('sys').argv[1])",
            platform="SpiNNaker",
            collab_id=collab,
        )
        for collab in ("private-neuro", "course-a", "lab-x")
    ]
    for uri in uris:
        wait_for(lambda: client.job_status(uri) in ("finished", "error"), 120, f"job {uri}")
        job = client.get_job(uri, with_log=True)
        assert job["status"] == "finished" and job["user_id"] == "neuro", job["log"]
    assert set(client.completed_jobs("course-a")) == {uris[1]}
    client.download_data(client.get_job(uris[2]), local_dir=str(tmp_path))
    assert (tmp_path / "o.txt").read_text() == "from spiNNaker"
    with pytest.raises(Exception, match="Error 404: You do not have access to the collab 'course-b'"):
        client.submit_job(source="print(1)", platform="SpiNNaker", collab_id="course-b")


def test_user_outside_the_allowed_groups_is_refused(hub, provider, nmpi_module):
    token = ebrains_token(hub, provider, "leaver", "pw-leaver-1", roles={"group": [GROUP], "team": []})
    provider.add_user("leaver", "pw-leaver-1", roles={"group": ["other-lab"], "team": []})  # left the group
    r = requests.post(
        hub.jobs_url + "/jobs/",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        json={"code": "print(1)", "collab": "private-leaver", "hardware_platform": "SpiNNaker"},
    )
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == (
        "Your EBRAINS account is not in the groups allowed to use this SpiNNaker service. "
        "To get access, ask spinnaker-support@example.org."
    )
    r = requests.get(hub.jobs_url + "/jobs/", headers={"Authorization": "Bearer forged"}, timeout=30)
    assert r.status_code == 401 and "current EBRAINS access token" in r.json()["detail"]
