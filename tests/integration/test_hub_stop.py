"""Stopping the hub is quick and complete: SIGTERM to a hub started in the background (as `make up &` or a script
does, which leaves SIGINT ignored) ends it within a few seconds, with its hub-managed services (the idle culler, the
EBRAINS access-token-service), and no service process is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from oidc_fixtures import ebrains_auth, hub_with_ebrains

# Seconds. JupyterHub waits 30 s for each service that ignores its SIGINT before it sends SIGTERM. Fixed, the hub's
# clean-up takes well under a second; the interpreter's own exit adds 1-3 s on a loaded 2-CPU machine.
STOP_WITHIN = 10


@contextlib.contextmanager
def started_in_background():
    """What a non-interactive shell does to a command started with `&`: SIGINT ignored, inherited by what it runs."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def children(pid: int) -> dict[int, str]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found[int(entry)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def stop_and_time(hub, services: list[str]) -> float:
    started = children(hub.proc.pid)
    for name in services:
        assert any(name in cmd for cmd in started.values()), (name, started)
    t0 = time.monotonic()
    hub.proc.terminate()
    try:
        hub.proc.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the hub did not exit within {STOP_WITHIN} s of SIGTERM:\n{hub.log()[-2000:]}") from None
    took = time.monotonic() - t0
    left = {pid: cmd for pid, cmd in started.items() if alive(pid)}
    assert not left, f"the stopped hub left its processes running: {left}"
    print(f"hub stop took {took:.2f} s")
    return took


def test_ebrains_hub_stops_within_seconds(hub_factory, oidc_provider):
    hub = hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {"culler": {"timeout": 60, "every": 10}, "auth": ebrains_auth(oidc_provider, allow_all=True)},
        start=False,
    )
    with started_in_background():
        hub.start()
    stop_and_time(hub, ["jupyterhub_idle_culler", "spinnaker_jupyter.access_token_service"])
    assert "...done" in hub.log()


def test_hub_with_the_culler_stops_within_seconds(hub_factory):
    hub = hub_factory({"culler": {"timeout": 60, "every": 10}}, start=False)
    with started_in_background():
        hub.start()
    stop_and_time(hub, ["jupyterhub_idle_culler"])
    assert "...done" in hub.log()  # a clean exit, not the fixture's SIGKILL
