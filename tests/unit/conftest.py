"""The unit lane (`make test-unit`): tests that need no hub, kernel env, podman, browser or network.

Every test here is guarded: starting a process (subprocess.Popen, os.system, os.fork, os.posix_spawn) or connecting
a socket to anything but a listener of this very process (a server a test runs in a thread on loopback or a unix
socket) fails the test, naming the call, so that the lane stays fast and honest. Tests that need more belong in
tests/ (the integration lane). The root tests/conftest.py is loaded too; importing it starts nothing.

Shared fixtures here must stay cheap: no process, no network, no hub.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp*
ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix: a listening unix socket


def _own_socket_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _own_tcp_listening_ports(inodes: set[int]) -> set[int]:
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _own_unix_listening_paths(inodes: set[int]) -> set[str]:
    paths = set()
    for line in Path("/proc/self/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[3], 16) & ACCEPTCON and int(fields[6]) in inodes:
            paths.add(fields[7].replace("@", "\0", 1) if fields[7].startswith("@") else fields[7])
    return paths


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _in_process_listener(sock: socket.socket, address) -> bool:
    """Whether `address` is a listener this process holds (a server a test runs in a thread)."""
    if sock.family == socket.AF_UNIX:
        path = os.fsdecode(address) if isinstance(address, (bytes, os.PathLike, str)) else str(address)
        return path in _own_unix_listening_paths(_own_socket_inodes())
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return _is_loopback(str(host)) and port in _own_tcp_listening_ports(_own_socket_inodes())
    return False


@pytest.fixture(autouse=True)
def _no_process_no_network(monkeypatch):
    """Fail the test on a process start or an outside connection (raised at the call, and again at teardown, in case
    the code under test caught the error)."""
    violations: list[str] = []

    def refuse(what: str):
        violations.append(what)
        raise RuntimeError(
            f"unit tests start no process and open no outside connection: {what} "
            "(a test that needs it belongs in tests/, the integration lane)"
        )

    def popen(self, args, *a, **kw):
        refuse(f"subprocess.Popen({args!r})")

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *a, _name=name, **kw: refuse(f"os.{_name}{a!r}"))

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _in_process_listener(self, address):
            refuse(f"socket connect to {address!r}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _in_process_listener(self, address):
            refuse(f"socket connect_ex to {address!r}")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield
    if violations:
        pytest.fail("this unit test tried: " + "; ".join(violations), pytrace=False)


@pytest.fixture
def write_config(tmp_path):
    """Write a deployment YAML (a dict, as an operator writes it) into a tmp file; returns its path. Relative
    `data_dir` defaults to a folder under tmp_path, so nothing outside the test's folder is touched."""

    def write(d: dict, name: str = "spinnaker-jupyter.yaml") -> Path:
        d = {"data_dir": str(tmp_path / "data"), **d}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(d))
        return path

    return write
