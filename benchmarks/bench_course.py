"""A room of students logging in at once: N new users (default 30) start their servers at the same moment through
the hub's REST API, on this project's hub and on a stock JupyterHub 6.1.1 (SimpleLocalProcessSpawner, its defaults)
in the same run.

  first / median / p95 / last ready (seconds from the moment all N start requests were sent), failures;
  the CPU floor: N x (measured CPU-seconds of one server start) / cores, and each figure as a ratio to it; and the
  floor of the whole start: N x (CPU-s per start of the hub's side and of the server during the burst) / cores;
  CPU-seconds of one server start: stock jupyterhub-singleuser with the project's extension and settings as they
  were ("before") and through spinnaker_jupyter.singleuser with the current settings ("after"), each the median of
  3 starts, from exec until it answers plus one second (what it does right after), children included;
  login form -> JupyterLab answers for one user at a time (median of 10), so that it does not get worse;
  stock JupyterHub's own floor: the same burst on it with servers that cost nothing (INSTANT_SPAWNER), and the
  CPU-seconds per start of its hub and proxy.

Run: `.venv/bin/python benchmarks/bench_course.py [--users 30] [--skip-stock] [--login-users 10] [--fork-server]` (as
root: one system account per user, as in production). `--fork-server`: the hub's servers forked from its fork server
(spawner.local.fork_server), and "after" measured from the fork. Prints a table and writes
benchmarks/results-course[-fork].json. The machine's load
(`uptime`) is recorded before and after: other work on the machine slows every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_hub import remove_accounts  # noqa: E402
from conftest import BIN, ENVS, RunningHub, free_port, traversable_tmpdir  # noqa: E402
from hubclient import wait_for  # noqa: E402
from spinnaker_jupyter.spawn_queue import forked_concurrency  # noqa: E402

CORES = len(os.sched_getaffinity(0))
#: The user-server settings as they were before the start-up cuts (hubconfig.write_server_config then).
BEFORE_SETTINGS = {
    "ServerApp": {"jpserver_extensions": {"spinnaker_jupyter_ext": True, "jupyter_server_proxy": True}},
    "ServerProxy": {"host_allowlist": ["localhost", "127.0.0.1"]},
    "KernelManager": {"transport": "ipc"},
}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- CPU-seconds of one server start ----------------------------------------------------------------------------
class _StubHub(http.server.BaseHTTPRequestHandler):
    """What jupyterhub-singleuser asks the hub at start-up (its version, activity): answered with 200."""

    def _ok(self):
        self.send_response(200)
        self.send_header("X-JupyterHub-Version", "6.1.1")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _ok

    def log_message(self, *args):
        pass


def cpu_per_start(command: list[str], settings: dict, runs: int = 3, fork_server=None) -> dict:
    """`fork_server` (a started fork_server.ForkServer): each server forked from it (`command` must then be the
    project's launcher), its CPU counted from the fork."""
    base = traversable_tmpdir("bench-cpu-")
    (base / "etc").mkdir()
    (base / "etc" / "jupyter_server_config.json").write_text(json.dumps(settings))
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    hub_api = f"http://127.0.0.1:{stub.server_address[1]}/hub/api"
    cpu, wall = [], []
    try:
        for i in range(runs):
            port, home = free_port(), base / f"home{i}"
            home.mkdir()
            env = {
                "PATH": os.environ["PATH"],
                "HOME": str(home),
                "USER": "root",
                "JUPYTER_CONFIG_PATH": str(base / "etc"),
                "SPINNAKER_TUTORIALS_DIR": str(ROOT / "notebooks"),
                "JUPYTERHUB_API_TOKEN": secrets.token_hex(16),
                "JUPYTERHUB_API_URL": hub_api,
                "JUPYTERHUB_CLIENT_ID": "jupyterhub-user-b",
                "JUPYTERHUB_USER": "b",
                "JUPYTERHUB_SERVER_NAME": "",
                "JUPYTERHUB_SERVICE_PREFIX": "/user/b/",
                "JUPYTERHUB_OAUTH_CALLBACK_URL": "/user/b/oauth_callback",
                "JUPYTERHUB_BASE_URL": "/",
                "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}/user/b/",
                "JUPYTERHUB_ACTIVITY_URL": f"{hub_api}/users/b/activity",
            }
            t0 = time.monotonic()
            if fork_server:
                from spinnaker_jupyter.fork_server import Request

                req = Request([*command, "--allow-root"], env, str(home), str(base / f"log{i}"))
                proc = _Forked(asyncio.run(fork_server.start(req, 60)))
            else:
                proc = subprocess.Popen(
                    [*command, "--allow-root"],
                    env=env,
                    cwd=home,
                    stdout=subprocess.DEVNULL,
                    stderr=open(base / f"log{i}", "w"),
                )
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError((base / f"log{i}").read_text()[-2000:]) from None
                    time.sleep(0.02)
            wall.append(time.monotonic() - t0)
            time.sleep(1.0)
            cpu.append(_cpu_s(proc.pid))
            proc.terminate()
            proc.wait()
    finally:
        stub.shutdown()
    return {"cpu_s": statistics.median(cpu), "cpu_runs": cpu, "listening_s": statistics.median(wall)}


class _Forked:
    """A server forked by the fork server (not this process's child): enough of Popen for cpu_per_start."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self) -> int | None:
        return None if Path(f"/proc/{self.pid}").exists() else 0

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)

    def wait(self) -> None:
        wait_for(lambda: self.poll() is not None, 30, f"forked server {self.pid} to end")


def fork_server_for(base: Path):
    """A fork server of this process, as a hub starts one (its start() waits until it listens)."""
    from spinnaker_jupyter.fork_server import ForkServer

    zygote = ForkServer(str(base / "fork-server"))
    zygote.launch({"PATH": os.environ["PATH"]})  # (what cpu_per_start gives each server, besides its own)
    return zygote


# -- N servers at once -------------------------------------------------------------------------------------------
def burst(url: str, token: str, names: list[str], timeout: float = 400, cpu=None) -> dict:
    """Create the users, request all their servers at once, note when each is ready; stop them all.

    Each user is followed as the browser's spawn page follows them: one request to start the server, then the
    server's progress event stream (`/hub/api/users/NAME/server/progress`) until its `ready` (or `failed`) event.
    (Earlier versions asked the hub for every user's state 4 times a second instead: GET /hub/api/users cost the
    hub up to 0.3 CPU-s each, so the measuring took CPU from the starts it measured.) `cpu`, if given, is read
    before the burst and once every start has ended, before the servers are stopped: CPU-seconds by what spent
    them ({"hub": ..., "servers": ...}), reported per start, with the share of the machine's CPU time left idle."""
    headers = {"Authorization": f"token {token}"}
    api = f"{url}/hub/api"
    r = requests.post(f"{api}/users", json={"usernames": names}, headers=headers, timeout=60)
    assert r.status_code in (201, 409), r.text
    codes: dict[str, int] = {}
    ready: dict[str, float] = {}
    failed: dict[str, str] = {}
    go = threading.Event()

    def follow(name: str) -> None:
        with requests.Session() as session:
            session.headers.update(headers)
            go.wait()
            try:
                codes[name] = session.post(f"{api}/users/{name}/server", timeout=timeout).status_code
                if codes[name] == 201:  # ready before the hub answered (slow_spawn_timeout)
                    ready[name] = time.monotonic() - t0
                    return
                if codes[name] != 202:
                    failed[name] = f"HTTP {codes[name]}"
                    return
                with session.get(f"{api}/users/{name}/server/progress", stream=True, timeout=timeout) as events:
                    for line in events.iter_lines(decode_unicode=True):
                        if not line or not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        if event.get("ready"):
                            ready[name] = time.monotonic() - t0
                            return
                        if event.get("failed"):
                            failed[name] = event.get("message", "failed")
                            return
                failed.setdefault(name, f"progress stream ended (HTTP {events.status_code})")
            except requests.RequestException as e:
                failed[name] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=follow, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    cpu_before, machine_before = (cpu(), machine_cpu()) if cpu else (None, None)
    client_before = _own_cpu()
    t0 = time.monotonic()
    go.set()
    for t in threads:
        t.join(max(0.0, t0 + timeout - time.monotonic()))
    client = _own_cpu() - client_before  # (this process: the N clients, what a browser per student would do)
    spent = {k: v - cpu_before[k] for k, v in cpu().items()} if cpu else None
    machine = [b - a for a, b in zip(machine_before, machine_cpu(), strict=True)] if cpu else None
    for name in names:
        requests.delete(f"{api}/users/{name}/server", headers=headers, timeout=60)
    times = sorted(ready.values())
    out = {
        "n": len(names),
        "ready": len(times),
        "failed": len(names) - len(times),
        "refused_429": sum(1 for c in codes.values() if c == 429),
        "failures": sorted(set(failed.values()))[:5],
    }
    if spent is not None:
        for what, seconds in {**spent, "client": client}.items():
            out[f"{what}_cpu_s_per_start"] = seconds / len(names)
        out["machine_idle_share"] = machine[1] / machine[0] if machine[0] else None
    if times:
        out.update(
            first=times[0],
            median=statistics.median(times),
            p95=times[min(len(times) - 1, int(round(0.95 * len(times))) - 1)],
            last=times[-1],
        )
    return out


def our_hub(users: int, concurrency: int | None = None, fork_server: bool = False) -> tuple[dict, RunningHub]:
    overrides = {"git_kernel": {"enabled": False}, "spawner": {"local": {"fork_server": fork_server}}}
    if concurrency:
        overrides["spawner"]["start_queue"] = {"concurrency": concurrency}
    hub = RunningHub(traversable_tmpdir("bench-course-"), overrides, ENVS).start()
    admin = hub.client("benchadmin", hub.add_user("benchadmin", admin=True))
    tag = secrets.token_hex(2)
    return burst(hub.url, admin.token, [f"s{tag}{i:02d}" for i in range(users)], cpu=lambda: hub_side_cpu(hub)), hub


def hub_side_cpu(hub: RunningHub) -> dict:
    """CPU-seconds so far of the user servers (what runs under them included) and of the hub's side of their starts:
    the hub, the proxy and the hub's services, with what they ran and waited for (useradd and the like)."""
    import processes

    procs = processes.table()
    total = {"hub": 0.0, "servers": 0.0}
    for p in hub.own_processes():
        what = "servers" if processes.SINGLEUSER in p.cmdline or processes.in_user_server(p, procs) else "hub"
        total[what] += _cpu_s(p.pid)
    return total


def _tree_cpu(pid: int) -> float:
    """CPU-seconds so far of process `pid` and all it started (a hub: also its proxy, which runs in a session of its
    own)."""
    import processes

    return _cpu_s(pid) + sum(_cpu_s(p.pid) for p in processes.descendants(pid, processes.table()))


def _cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid` (what it waited for included); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU-seconds of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def machine_cpu() -> tuple[int, int]:
    """(all, idle) CPU time of the machine so far, in ticks (/proc/stat: idle and iowait count as idle)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


#: A spawner whose servers cost nothing: each user's "server" is the benchmark's one HTTP server, always up, so a
#: burst on it measures what the hub itself (and its proxy) spends on N starts.
INSTANT_SPAWNER = """
from jupyterhub.spawner import Spawner

class InstantSpawner(Spawner):
    async def start(self):
        return ("127.0.0.1", {port})

    async def poll(self):
        return None

    async def stop(self, now=False):
        pass

c.JupyterHub.spawner_class = InstantSpawner
"""


def stock_hub(users: int, instant: bool = False) -> dict:
    """JupyterHub 6.1.1 as it comes: SimpleLocalProcessSpawner (servers as the hub's account, homes in a folder),
    its default timeouts and readiness polling, the same proxy. `instant`: servers that cost nothing instead
    (INSTANT_SPAWNER), and the CPU-seconds of the hub and its proxy per start: the hub's own floor."""
    base = traversable_tmpdir("bench-stock-")
    stub = None
    if instant:
        stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
    token, port = secrets.token_hex(16), free_port()
    config = f"""
c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
c.JupyterHub.hub_port = {free_port()}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
c.ConfigurableHTTPProxy.command = [{str(ROOT / "node_modules" / ".bin" / "configurable-http-proxy")!r}]
c.ConfigurableHTTPProxy.auth_token = {secrets.token_hex(16)!r}
c.JupyterHub.db_url = "sqlite:///{base}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{base}/cookie_secret"
c.JupyterHub.pid_file = "{base}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{base}/homes/{{username}}"
c.Spawner.cmd = [{str(BIN / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.default_url = "/lab"
c.JupyterHub.services = [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "bench", "services": ["bench"],
                            "scopes": ["admin:users", "admin:servers", "list:users", "read:users", "read:servers"]}}]
"""
    if stub:
        config += INSTANT_SPAWNER.format(port=stub.server_address[1])
    (base / "jupyterhub_config.py").write_text(config)
    log = open(base / "hub.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "jupyterhub"), "-f", str(base / "jupyterhub_config.py")],
        cwd=base,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), 60, "the stock hub")
        cpu = (lambda: {"hub": _tree_cpu(proc.pid)}) if instant else None
        return burst(url, token, [f"k{secrets.token_hex(2)}{i:02d}" for i in range(users)], cpu=cpu)
    finally:
        if stub:
            stub.shutdown()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        for pid in _running_in(base):  # what the stock hub left in its own folder (its servers' working dirs)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _running_in(folder: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd").startswith(str(folder)):
                    pids.append(int(entry.name))
    return pids


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/hub/api/", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--login-users", type=int, default=10)
    ap.add_argument("--skip-stock", action="store_true")
    ap.add_argument("--concurrency", type=int, help="spawner.start_queue.concurrency (default: the hub's default)")
    ap.add_argument(
        "--fork-server",
        action="store_true",
        help="spawner.local.fork_server on: the burst's servers, and the 'after' CPU-s of one start, forked from it",
    )
    args = ap.parse_args()
    results = {
        "cores": CORES,
        "load_before": load(),
        "concurrency": args.concurrency or (forked_concurrency(CORES) if args.fork_server else CORES),
    }  # (spawn_queue's default)
    results["cpu_before"] = cpu_per_start([str(BIN / "jupyterhub-singleuser")], BEFORE_SETTINGS)
    after = json.loads(json.dumps(BEFORE_SETTINGS))
    after["ServerApp"]["jpserver_extensions"]["jupyter_lsp"] = False
    after["LabApp"] = {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "extension_manager": "readonly",
    }
    launcher = [sys.executable, "-m", "spinnaker_jupyter.singleuser", str(BIN / "jupyterhub-singleuser")]
    if args.fork_server:
        results["fork_server"] = True
        zygote = fork_server_for(traversable_tmpdir("bench-fork-server-"))
        try:
            results["cpu_after"] = cpu_per_start(launcher, after, fork_server=zygote)
        finally:
            zygote.proc.terminate()
            zygote.proc.wait()
    else:
        results["cpu_after"] = cpu_per_start(launcher, after)
    results["cpu_stock"] = cpu_per_start([str(BIN / "jupyterhub-singleuser")], {})
    ours, hub = our_hub(args.users, args.concurrency, args.fork_server)
    results["ours"] = ours
    try:
        if args.login_users:
            from bench_hub import bench_login_to_lab

            results["login_to_lab"] = bench_login_to_lab(hub, args.login_users)["login_to_lab_s"]
    finally:
        hub.stop(final=True)
        remove_accounts(hub)
    if not args.skip_stock:
        results["stock_instant"] = stock_hub(args.users, instant=True)  # (first: the real burst leaves load behind)
        results["stock"] = stock_hub(args.users)
    results["load_after"] = load()
    for key, cpu in (("ours", results["cpu_after"]["cpu_s"]), ("stock", results["cpu_stock"]["cpu_s"])):
        r = results.get(key)
        if r and "median" in r:
            r["floor_s"] = args.users * cpu / CORES
            _over(r, "floor")
    ours = results["ours"]
    if "median" in ours:  # the floor of everything a start cost during the burst: the hub's side as well
        ours["whole_floor_s"] = args.users * (ours["hub_cpu_s_per_start"] + ours["servers_cpu_s_per_start"]) / CORES
        _over(ours, "whole_floor")
    print(table(results, args.users))
    name = f"results-course{f'-c{args.concurrency}' if args.concurrency else ''}{'-fork' if args.fork_server else ''}"
    (ROOT / "benchmarks" / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")


FIGURES = ("first", "median", "p95", "last")


def _over(r: dict, floor: str) -> None:
    """Each figure of a burst's result `r` over its floor `r[floor + "_s"]`, as `r["<figure>_over_<floor>"]`."""
    for k in FIGURES:
        r[f"{k}_over_{floor}"] = r[k] / r[f"{floor}_s"]


def _ratios(r: dict, floor: str) -> str:
    return " / ".join(f"{r[f'{k}_over_{floor}']:.2f}" for k in FIGURES)


def table(r: dict, n: int) -> str:
    rows = [
        f"{n} users at once, {r['cores']} cores; load {r['load_before']} -> {r['load_after']}"
        + ("; fork server on" if r.get("fork_server") else ""),
        "| hub | ready | failed | first | median | p95 | last | floor | first/median/p95/last over floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, name in (("ours", "this project"), ("stock", "stock JupyterHub 6.1.1")):
        x = r.get(key)
        if not x:
            continue
        if "median" not in x:
            rows.append(f"| {name} | {x['ready']} | {x['failed']} | | | | | | |")
            continue
        rows.append(
            f"| {name} | {x['ready']} | {x['failed']} | {x['first']:.1f} s | {x['median']:.1f} s | "
            f"{x['p95']:.1f} s | {x['last']:.1f} s | {x['floor_s']:.1f} s | {_ratios(x, 'floor')} |"
        )
    rows.append(
        f"CPU-s per server start: before {r['cpu_before']['cpu_s']:.2f}, after {r['cpu_after']['cpu_s']:.2f}, "
        f"stock {r['cpu_stock']['cpu_s']:.2f}"
    )
    if "hub_cpu_s_per_start" in r.get("ours", {}):
        o = r["ours"]
        rows.append(
            f"during the burst, per start: {o['servers_cpu_s_per_start']:.2f} CPU-s of the server (alone: "
            f"{r['cpu_after']['cpu_s']:.2f}), {o['hub_cpu_s_per_start']:.2f} of the hub side; the machine idle "
            f"{100 * o['machine_idle_share']:.0f}% of the time; the benchmark's own clients "
            f"{o['client_cpu_s_per_start']:.2f}"
        )
    if "whole_floor_s" in r.get("ours", {}):
        o = r["ours"]
        rows.append(
            f"floor of the whole start (hub side + server, during the burst): {o['whole_floor_s']:.1f} s; first / "
            f"median / p95 / last over it: {_ratios(o, 'whole_floor')}"
        )
    x, o = r.get("stock_instant"), r.get("ours", {})
    if x and "median" in x:
        line = (
            f"stock JupyterHub 6.1.1 with servers that cost nothing (the hub's own floor): {x['ready']} ready, first "
            f"{x['first']:.1f} s, median {x['median']:.1f} s, last {x['last']:.1f} s; "
            f"{x['hub_cpu_s_per_start']:.3f} CPU-s of the hub and proxy per start"
        )
        if "floor_s" in o:
            line += f"; its median / last over this project's floor: {x['median'] / o['floor_s']:.2f} / "
            line += f"{x['last'] / o['floor_s']:.2f}"
        rows.append(line)
    if "login_to_lab" in r:
        lt = r["login_to_lab"]
        rows.append(f"login -> JupyterLab: median {lt['median']:.2f} s ({lt['min']:.2f}-{lt['max']:.2f}, n={lt['n']})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
