"""Course mode: a teacher starts the servers of a class before it begins (`spinnaker-jupyter course start`), through
the same start queue as logins; a real hub starting one server at a time."""

from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def hub(hub_factory):
    # Servers start as new Pythons (~1.3 CPU-s each; a forked start takes ~0.07 s, and five were all up before the
    # command's first look at the line), so that the students' places in the line are seen while they wait.
    return hub_factory({"spawner": {"start_queue": {"concurrency": 1, "limit": 50}, "local": {"fork_server": False}}})


@pytest.fixture(scope="module")
def teacher(hub):
    return hub.client("cteacher", hub.add_user("cteacher", admin=True))


@pytest.fixture(scope="module")
def student(hub):
    return hub.client("cstud", hub.add_user("cstud"))


def test_course_start_starts_a_group_in_line_and_reports_progress(hub, teacher):
    names = ["ctom", "cuma", "cvic", "cwes", "cxia"]
    assert teacher.api("POST", "/users", json={"usernames": names}).status_code == 201
    assert teacher.api("POST", "/groups/cls-a", json={"users": names}).status_code == 201

    r = hub.cli("course", "start", "cls-a", "--wait", "300")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "5 of 5 ready" in out, out
    # one at a time: the others were told their place in the line while they waited
    assert re.search(r"  c[a-z]+: starting: [1-4] servers? (is|are) starting before yours", out), out
    for name in names:
        assert f"  {name}: ready" in out
        assert teacher.api("GET", f"/users/{name}").json()["servers"][""]["ready"]

    # Again: nothing to start, all are reported ready.
    again = hub.cli("course", "start", "--users", "ctom,cuma", "--wait", "60")
    assert again.returncode == 0 and "2 of 2 ready" in again.stdout, again.stdout
    for name in names:
        assert teacher.api("DELETE", f"/users/{name}/server").status_code in (202, 204)


def test_unknown_names_and_groups_are_said_and_lose_nothing(hub, teacher):
    r = hub.cli("course", "start", "no-such-class")
    assert r.returncode != 0
    assert "No hub group 'no-such-class'" in r.stderr + r.stdout
    r = hub.cli("course", "start", "--users", "nobody-x", "--wait", "10")
    assert r.returncode == 1
    assert "nobody-x: no such hub user" in r.stdout


def test_only_admins_start_a_course(hub, student):
    r = student.api("POST", "/spinnaker/course/start", json={"users": ["cstud"]})
    assert r.status_code == 403
    r = student.api("GET", "/spinnaker/course", params={"users": "cstud"})
    assert r.status_code == 403
    assert student.server_model() is None
