"""The board record: the spawner state's ``spinnaker`` dict, typed, loading what hubs stored before it existed."""

from __future__ import annotations

import copy

import pytest

from spinnaker_jupyter.boards.record import BoardRecord

# Dicts exactly as the hub wrote them into its database before the typed record (boards.py of 2026-12-01).
OLD_STATES = {
    "session, running": {
        "mode": "session",
        "boards": 1,
        "board": "10.11.192.1",
        "version": 5,
        "job_id": 7,
        "job_url": "https://spalloc.example/spalloc/srv/spalloc/jobs/7",
        "state": "READY",
        "claimed_at": "2026-12-01T10:00:00Z",
    },
    "session, claim waiting": {
        "mode": "session",
        "boards": 2,
        "state": "QUEUED",
        "job_id": 8,
        "job_url": "https://spalloc.example/spalloc/srv/spalloc/jobs/8",
    },
    "session, released": {
        "mode": "session",
        "boards": 1,
        "board": "10.11.192.1",
        "version": 5,
        "job_id": 7,
        "job_url": "https://spalloc.example/spalloc/srv/spalloc/jobs/7",
        "state": "READY",
        "claimed_at": "2026-12-01T10:00:00Z",
        "released": True,
    },
    "session, lost": {
        "mode": "session",
        "boards": 1,
        "board": "10.11.192.1",
        "version": 5,
        "job_id": 7,
        "job_url": "https://spalloc.example/spalloc/srv/spalloc/jobs/7",
        "state": "DESTROYED",
        "claimed_at": "2026-12-01T10:00:00Z",
        "lost": "keepalive expired",
        "lost_at": "2026-12-01T11:00:00Z",
    },
    "fallback": {
        "mode": "session",
        "fallback": "virtual",
        "notice": "No SpiNNaker board for this session: ...",
        "since": "2026-12-01T10:00:00Z",
    },
    "machine, held": {
        "mode": "machine",
        "board": "spinn-4",
        "version": 5,
        "held": True,
        "claimed_at": "2026-12-01T10:00:00Z",
    },
    "machine, given back": {
        "mode": "machine",
        "board": "spinn-4",
        "version": 5,
        "held": False,
        "claimed_at": "2026-12-01T10:00:00Z",
    },
    "virtual": {"mode": "virtual"},
}


@pytest.mark.parametrize("name", sorted(OLD_STATES))
def test_an_old_state_dict_loads_and_is_stored_back_unchanged(name):
    stored = copy.deepcopy(OLD_STATES[name])
    record = BoardRecord.from_dict(stored)
    assert record is not None and record.mode == stored["mode"]
    assert record.to_dict() == OLD_STATES[name]


def test_what_an_old_state_holds():
    holds = {name: BoardRecord.from_dict(d).holds for name, d in OLD_STATES.items()}
    assert holds == {
        "session, running": True,
        "session, claim waiting": True,
        "session, released": False,
        "session, lost": False,
        "fallback": False,
        "machine, held": True,
        "machine, given back": False,
        "virtual": False,
    }


def test_keys_of_another_version_are_kept_and_no_state_is_no_record():
    newer = {**OLD_STATES["session, running"], "proxy_ref": "wss://spalloc.example/proxy/7"}
    record = BoardRecord.from_dict(newer)
    assert record.job_id == 7 and record.extra == {"proxy_ref": "wss://spalloc.example/proxy/7"}
    assert record.to_dict() == newer
    assert BoardRecord.from_dict({}) is None and BoardRecord.from_dict(None) is None
