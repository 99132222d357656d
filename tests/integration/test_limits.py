"""Resource limits of local user servers (issue 10, finding 8): a user's fork loop stops at spawner.process_limit
and the hub still answers; a memory hog beyond spawner.mem_limit is refused. Both ways the hub enforces them: a
cgroup per server (where the machine offers one, as here) and rlimits."""

from __future__ import annotations

import pytest
import requests

LIMITS = {"process_limit": 64, "mem_limit": "700M", "cpu_limit": 0.5}

# Run in the kernel: fork until refused, ask the hub for its API root while all those children live (from this same
# process: at the limit the kernel cannot start even a thread), then end them.
FORK_LOOP = """
import os, signal, time, urllib.request
children, err = [], None
try:
    for _ in range(2000):
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        children.append(pid)
except OSError as e:
    err = e.errno
t0 = time.monotonic()
status = urllib.request.urlopen("{url}/hub/api/", timeout=10).status
took = time.monotonic() - t0
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print("FORKED", len(children), "ERRNO", err, "HUB", status, round(took, 2))
"""

MEMORY_HOG = """
import subprocess, sys
hog = "b = bytearray(1 << 30); b[::4096] = bytes(len(b) // 4096); print('GOT IT')"
r = subprocess.run([sys.executable, "-c", hog], capture_output=True, text=True)
print("HOG", r.returncode, "GOT IT" in r.stdout, r.stderr.strip().splitlines()[-1:] )
"""


@pytest.fixture(scope="module", params=["cgroup", "rlimits"])
def limited(request, hub_factory):
    hub = hub_factory({"spawner": {**LIMITS, "local": {"limits": request.param}}, "culler": {"enabled": False}})
    name = "lim" + request.param[:2]  # one system account per deployment (both hubs live until the module ends)
    user = hub.client(name, hub.add_user(name))
    user.start_server()
    yield request.param, hub, user
    user.stop_server()


def test_check_and_startup_say_which_limits_apply(limited):
    mode, hub, _ = limited
    said = hub.cli("check").stdout
    expected = "a cgroup per server" if mode == "cgroup" else "rlimits"
    assert "limited to 64 processes, 700 MiB memory, 0.5 CPU" in said and expected in said, said
    assert expected in hub.log()


def test_fork_loop_stops_at_the_limit_and_the_hub_answers(limited):
    _, hub, user = limited
    kernel = user.start_kernel("spynnaker")
    out = user.execute(kernel, FORK_LOOP.replace("{url}", hub.url))
    words = out["stdout"].split()
    assert words[:1] == ["FORKED"] and int(words[1]) < 64 and words[3] == "11", out  # EAGAIN at the limit
    assert words[5] == "200" and float(words[6]) < 5, out  # the hub answered while the children lived
    # The server and its kernel still work once the loop is over.
    assert user.server("GET", "api/contents").status_code == 200
    assert user.execute(kernel, "print('still here')")["stdout"].strip() == "still here"


def test_memory_hog_is_refused(limited):
    _, hub, user = limited
    kernel = user.start_kernel("spynnaker")
    out = user.execute(kernel, MEMORY_HOG)
    assert "HOG" in out["stdout"] and "False" in out["stdout"] and "HOG 0 " not in out["stdout"], out
    assert requests.get(f"{hub.url}/hub/api/", timeout=10).status_code == 200
    assert user.execute(kernel, "print('still here')")["stdout"].strip() == "still here"


def test_cgroup_v2_files_written(tmp_path):
    """This machine offers only v1 controllers, so the v2 layout is checked on a folder shaped like one: the limits
    land in the files and units the kernel reads (Documentation/admin-guide/cgroup-v2.rst)."""
    from spinnaker_jupyter.limits import CgroupTree, Limits, parse_bytes

    tree = tmp_path / "spinnaker-jupyter-x"
    tree.mkdir()
    (tree / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    joined = CgroupTree("cgroup2", {"": tree}).create("ann.lab", Limits(mem=parse_bytes("512M"), cpu=0.5, tasks=64))
    assert joined == [tree / "ann.lab"]
    assert (tree / "cgroup.subtree_control").read_text().split() == ["+pids", "+memory", "+cpu"]
    files = {
        f: (tree / "ann.lab" / f).read_text().strip() for f in ("pids.max", "memory.max", "memory.swap.max", "cpu.max")
    }
    assert files == {
        "pids.max": "64",
        "memory.max": str(512 * 2**20),
        "memory.swap.max": "0",
        "cpu.max": "50000 100000",
    }
