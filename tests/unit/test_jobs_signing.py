"""Signed job-file and upload links (jobs/signing.py): good for at least their ttl, refused once expired or changed."""

from __future__ import annotations

import time
from unittest import mock
from urllib.parse import parse_qs, urlparse

from spinnaker_jupyter.jobs import signing

KEY = b"k" * 32


def _query(url: str) -> tuple[str, str]:
    q = parse_qs(urlparse(url).query)
    return q["expires"][0], q["signature"][0]


def test_a_link_lives_at_least_its_ttl():
    now = 1_700_000_000.999  # just before a whole second: rounding down would leave it 0.001 s of a 1 s ttl
    with mock.patch.object(signing.time, "time", return_value=now):
        expires, signature = _query(signing.sign(KEY, "http://h/", 3, "out/a.txt", 1))
    assert int(expires) >= now + 1
    with mock.patch.object(signing.time, "time", return_value=now + 1):
        assert signing.check(KEY, 3, "out/a.txt", expires, signature) is None
    with mock.patch.object(signing.time, "time", return_value=int(expires) + 1):
        assert "expired" in signing.check(KEY, 3, "out/a.txt", expires, signature)


def test_a_changed_link_is_refused():
    expires, signature = _query(signing.sign(KEY, "http://h/", 3, "out/a.txt", 60))
    assert "not valid" in signing.check(KEY, 3, "out/b.txt", expires, signature)
    assert "not valid" in signing.check(KEY, 4, "out/a.txt", expires, signature)
    assert "not valid" in signing.check(KEY, 3, "out/a.txt", str(int(expires) + 60), signature)
    assert signing.check(KEY, 3, "out/a.txt", expires, signature) is None
    assert time.time() < int(expires)


def test_an_upload_link_lives_at_least_its_ttl():
    now = 1_700_000_000.5
    with mock.patch.object(signing.time, "time", return_value=now):
        expires, _ = _query(signing.sign_upload(KEY, "http://h/", "abc.tar.gz", 1))
    assert int(expires) >= now + 1
