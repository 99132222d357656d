"""Idle culling: a server nobody uses is stopped after the configured timeout, and its files stay."""

from __future__ import annotations

from hubclient import wait_for


def test_idle_server_is_stopped_and_files_kept(hub_factory):
    hub = hub_factory({"culler": {"timeout": 60, "every": 10}})
    user = hub.client("sleepy", hub.add_user("sleepy"))
    user.start_server()
    assert user.server("PUT", "api/contents/kept.txt", json={"type": "file", "format": "text",
                                                             "content": "still here"}).status_code in (200, 201)
    wait_for(lambda: user.server_model() is None, 150, "the idle culler to stop the unused server", interval=2)
    assert "idle-culler" in hub.log() and "Culling server" in hub.log()
    user.start_server()
    assert user.server("GET", "api/contents/kept.txt").json()["content"] == "still here"
    user.stop_server()
