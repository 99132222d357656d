"""`spinnaker-jupyter boards`: through the running hub's REST API, else from its database, and it says which.

The hub is a stand-in HTTP server in a thread of this process (the real hub's answer is checked end to end in
tests/integration/test_boards.py); the database is a SQLite file with JupyterHub's two tables the command reads."""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spinnaker_jupyter import config
from spinnaker_jupyter.boards.admin import cli_boards
from spinnaker_jupyter.config import ConfigError

TOKEN = "c" * 64
JOB_URL = "https://spalloc.example/spalloc/srv/spalloc/jobs/7"
RECORD = {
    "mode": "session",
    "boards": 1,
    "board": "10.11.192.1",
    "version": 5,
    "job_id": 7,
    "job_url": JOB_URL,
    "state": "READY",
    "claimed_at": "2026-12-02T08:00:00Z",
}


class FakeHub:
    """Answers GET /hub/api/spinnaker/boards as the hub does, for the right token only (or with `status`)."""

    def __init__(self) -> None:
        self.status = 200
        self.asked: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub.asked.append(self.path)
                if self.headers.get("Authorization") != f"token {TOKEN}":
                    code, body = 403, {"message": "Forbidden"}
                elif hub.status != 200:
                    code, body = hub.status, {"message": "boom"}
                else:
                    code, body = (
                        200,
                        [
                            {
                                "user": "alice",
                                "server": "",
                                "configured_mode": "session",
                                "running": True,
                                "pending": None,
                                **RECORD,
                                "keepalive": "running",
                            }
                        ],
                    )
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture
def deployment(write_config, hub, monkeypatch):
    monkeypatch.delenv("SPINNAKER_JUPYTER_DB_URL", raising=False)
    d = config.load([write_config({"proxy": {"hub_port": hub.port}})])
    d.hub_dir.mkdir(parents=True, exist_ok=True)
    (d.hub_dir / "course-manager-token").write_text(TOKEN)
    # The database as a hub that has stopped left it: alice's server recorded as running with her board.
    db = sqlite3.connect(d.hub_dir / "jupyterhub.sqlite")
    db.executescript(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);"
        "CREATE TABLE spawners (id INTEGER PRIMARY KEY, user_id INTEGER, name TEXT, state TEXT, "
        "server_id INTEGER, started TEXT);"
    )
    db.execute("INSERT INTO users VALUES (1, 'alice')")
    db.execute(
        "INSERT INTO spawners VALUES (1, 1, '', ?, 3, '2026-12-02 08:00:00')",
        (json.dumps({"pid": 4321, "spinnaker": RECORD}),),
    )
    db.commit()
    db.close()
    return d


def hub_running(monkeypatch, running: bool) -> None:
    monkeypatch.setattr("spinnaker_jupyter.account_removal._hub_pid", lambda d: 4242 if running else None)


def test_with_the_hub_up_it_reads_the_hubs_rest_api(deployment, hub, monkeypatch, capsys):
    hub_running(monkeypatch, True)
    assert cli_boards(deployment) == 0
    out = capsys.readouterr().out
    assert "read from the running hub (its REST API)" in out, out
    assert "alice" in out and "board 10.11.192.1" in out and "job 7" in out and "keepalive running" in out, out
    assert hub.asked == ["/hub/api/spinnaker/boards?live=0"]
    assert cli_boards(deployment, as_json=True) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["source"] == "hub" and listing["servers"][0]["keepalive"] == "running"


def test_with_the_hub_down_it_reads_the_database_and_says_so(deployment, hub, monkeypatch, capsys):
    hub_running(monkeypatch, False)
    assert cli_boards(deployment) == 0
    out = capsys.readouterr().out
    assert "read from the hub's database (the hub is not running)" in out, out
    assert "alice" in out and "board 10.11.192.1" in out and "keepalive" not in out, out
    assert hub.asked == []


def test_a_hub_that_answers_with_an_error_is_read_from_the_database_with_the_reason(
    deployment, hub, monkeypatch, capsys
):
    hub_running(monkeypatch, True)
    hub.status = 500
    assert cli_boards(deployment) == 0
    out = capsys.readouterr().out
    assert "read from the hub's database (the running hub answered HTTP 500" in out and "may be behind" in out, out
    assert "board 10.11.192.1" in out


def test_a_refused_token_is_one_line_saying_what_to_do(deployment, monkeypatch):
    hub_running(monkeypatch, True)
    (deployment.hub_dir / "course-manager-token").write_text("x" * 64)
    with pytest.raises(ConfigError, match="refused the token in .*course-manager-token .*restart the hub"):
        cli_boards(deployment)
