"""The one reader of /proc/net/tcp(6) listeners (extensions/spinnaker_listeners.py), which the hub's start-up checks
(preflight: a port the hub sends secrets to is held by no one else) and the user servers' proxy guard (a route
reaches only its own account's listener) both use: fed the kernel's table text."""

from __future__ import annotations

import os
import socket

import spinnaker_listeners
from spinnaker_listeners import listeners, parse

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
TCP = HEADER + (
    # 127.0.0.1:8080 listening, uid 1000, inode 51234
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 51234 1 "
    "0000000000000000 100 0 0 10 0\n"
    # 0.0.0.0:22 listening, root
    "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1717 1 "
    "0000000000000000 100 0 0 10 0\n"
    # a connection to 127.0.0.1:8080 (established, state 01), uid 1001: not a listener
    "   2: 0100007F:1F90 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000  1001        0 61234 1 "
    "0000000000000000 20 4 30 10 -1\n"
    # 127.0.0.1:80 (0x50) listening: another port whose hex ends like 8080's decimal
    "   3: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 777 1 "
    "0000000000000000 100 0 0 10 0\n"
)
TCP6 = HEADER + (
    # [::1]:8080 listening, another account (uid 1001)
    "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 "
    "00:00000000 00000000  1001        0 99887 1 0000000000000000 100 0 0 10 0\n"
)


def test_only_the_listeners_on_the_port_with_their_owner():
    assert parse(TCP, 8080) == {51234: 1000}
    assert parse(TCP, 22) == {1717: 0}
    assert parse(TCP, 80) == {777: 1002}
    assert parse(TCP, 41668) == {}  # 0xA2C4 is only the far end of a connection


def test_ipv6_table():
    assert parse(TCP6, 8080) == {99887: 1001}


def test_a_header_alone_an_empty_table_or_a_torn_line_is_nothing_listening():
    assert parse(HEADER, 8080) == {}
    assert parse("", 8080) == {}
    torn = HEADER + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n" + "   1: garbage line here\n"
    assert parse(torn, 8080) == {}


def test_both_tables_count_and_a_missing_one_is_skipped(tmp_path):
    v4, v6 = tmp_path / "tcp", tmp_path / "tcp6"
    v4.write_text(TCP)
    v6.write_text(TCP6)
    # Another account holding ::1 while we hold 127.0.0.1 is seen: "localhost" may reach either.
    assert listeners(8080, (str(v4), str(v6))) == {51234: 1000, 99887: 1001}
    assert listeners(8080, (str(v4), str(tmp_path / "absent"))) == {51234: 1000}
    (tmp_path / "empty").write_text("")
    assert listeners(8080, (str(tmp_path / "empty"),)) == {}


def test_this_kernels_tables_show_a_socket_we_listen_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert listeners(port) == {}  # bound, not yet listening
        s.listen()
        found = listeners(port)
        assert list(found.values()) == [os.getuid()]
        inode = os.stat(f"/proc/self/fd/{s.fileno()}").st_ino
        assert list(found) == [inode]
    assert listeners(port) == {}


def test_the_hub_and_the_servers_read_listeners_the_same_way():
    from spinnaker_jupyter import preflight
    from spinnaker_jupyter_ext import listeners as server_listeners

    assert preflight.listeners is spinnaker_listeners.listeners
    assert server_listeners.listeners is spinnaker_listeners.listeners
