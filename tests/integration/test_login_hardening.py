"""Login back-off that strangers cannot turn against a user (local accounts, through the real hub's login form).

Failing logins with someone's name must not lock that person out of their own login: the back-off counts per (name,
client address), per address, and per name over all addresses (a guess spread over many places) except from the
addresses the name has logged in from. The client address is the proxy's X-Forwarded-For entry (local_accounts.
client_address): a test connecting from this machine says which address it stands for with that header.
"""

from __future__ import annotations

import re
import time

import pytest
import requests


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory({"culler": {"enabled": False}})


def login(hub, name, password, address) -> requests.Response:
    s = requests.Session()
    s.headers["X-Forwarded-For"] = address
    s.get(f"{hub.url}/hub/login", timeout=30)
    return s.post(
        f"{hub.url}/hub/login",
        data={"username": name, "password": password, "_xsrf": s.cookies.get("_xsrf", path="/hub/")},
        allow_redirects=False,
        timeout=60,
    )


def test_failing_with_someones_name_elsewhere_does_not_lock_them_out(hub):
    good = hub.add_user("fay")
    assert login(hub, "fay", good, "198.51.100.7").status_code == 302  # fay, from home
    for _ in range(6):
        login(hub, "fay", "wrong password", "203.0.113.66")  # a stranger, with fay's name
    refused = login(hub, "fay", "another guess", "203.0.113.66")
    assert refused.status_code == 429, refused.status_code
    wait = re.search(r"try again in (\d+) s\b", refused.text)
    assert wait and 1 <= int(wait.group(1)) <= 300, refused.text[-600:]  # the stranger is told how long
    # fay is not slowed, from home nor from a new place
    t0 = time.monotonic()
    assert login(hub, "fay", good, "198.51.100.7").status_code == 302
    assert login(hub, "fay", good, "192.0.2.44").status_code == 302
    assert time.monotonic() - t0 < 10


def test_a_guess_spread_over_many_addresses_backs_off_except_where_the_user_logs_in(hub):
    good = hub.add_user("gus")
    assert login(hub, "gus", good, "198.51.100.8").status_code == 302  # gus's own address
    for i in range(15):  # 30 failures from 15 addresses: under the per-(name, address) and per-address counts
        for _ in range(2):
            assert login(hub, "gus", "wrong password", f"203.0.113.{100 + i}").status_code == 403
    refused = login(hub, "gus", good, "203.0.113.200")  # even the right password, from somewhere new, waits
    assert refused.status_code == 429 and re.search(r"try again in \d+ s\b", refused.text), refused.status_code
    assert login(hub, "gus", good, "198.51.100.8").status_code == 302  # from where gus logs in: at once
