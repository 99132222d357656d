"""Orphaned spalloc jobs after a hub crash (issue 11, item 2), end to end: a real hub and proxy in session mode, a
spalloc test double with 2 boards, 4 users.

* The minimal case: two servers take both boards, a third start waits in the service's queue, the hub's process
  group is killed with SIGKILL (what a crash, an OOM kill or a power cut does), the hub is started again. The
  waiting job must be given back at once (not at the service's keepalive expiry), the two running servers keep
  their jobs (the restarted hub takes over their keepalives).
* The crash window between the hub's POST and its record of the answer: the double holds the answer to `POST jobs`
  while the hub is killed; the restarted hub must still find that job and give it back.
* A seeded random sequence of start / stop / kill-server / SIGTERM-hub / kill -9-hub, checking after every step:
  no user ever holds two live jobs, every running server holds its job, and (once the restarted hub has reconciled)
  no live job at the service lacks a server. `CHAOS_OPS` (default 40, bounded for CI) and `CHAOS_SEED` (default 11)
  choose the run; the counts of violations by kind are printed and written to tests/artifacts/board-chaos.json.

The hub's spalloc keepalive interval is 120 s: an orphan would live that long at the service, and each check gives
the hub at most 12 s to settle.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import threading
import time

import pytest

import processes
from conftest import secret_file
from doubles.spalloc_server import SpallocDouble
from hubclient import wait_for

HUB_TOKEN = "hub-spalloc-token"
KEEPALIVE = 120  # an orphan outlives every check below: it cannot hide behind the service's keepalive expiry
SETTLE = 12.0
USERS = ("chann", "chben", "chcat", "chdan")  # (names no other test module uses: one system account each)
RECONCILED = "SpiNNaker jobs reconciled with"
RECONCILE_FAILED = "SpiNNaker jobs: reconciliation with the allocation service failed"


@pytest.fixture(scope="module")
def double():
    d = SpallocDouble(boards=2, tokens={HUB_TOKEN: "hub"}, admins=["hub"], power_delay=0.2, wait_timeout=3.0).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def hub(hub_factory, double, tmp_path_factory):
    token_file = secret_file(tmp_path_factory, HUB_TOKEN)
    h = hub_factory(
        {
            "hub": {"stop_servers_on_exit": False},
            "spawner": {"poll_interval": 1},
            "culler": {"enabled": False},
            "spinnaker": {
                "mode": "session",
                "claim_timeout": 300,
                "on_timeout": "fail",
                "spalloc": {"url": double.url, "token_file": str(token_file), "keepalive_interval": KEEPALIVE},
            },
        }
    )
    yield h
    try:
        if h.proc is not None and h.proc.poll() is None:
            stop_everything(h, admin_of(h))
    finally:
        h.stop(final=True)


def admin_of(hub):
    return hub.client("admin", hub.cli("user", "passwd", "admin").stdout.strip().split()[-1])


@pytest.fixture(scope="module")
def people(hub):
    out = {name: hub.client(name, hub.add_user(name)) for name in USERS}
    out["admin"] = admin_of(hub)
    return out


# -------------------------------------------------------------------------------------------------- helpers
def reconciliations(hub) -> int:
    text = hub.log()
    return text.count(RECONCILED) + text.count(RECONCILE_FAILED)


def crash(hub) -> None:
    """kill -9 of the hub's process group, as a crash does. Its proxy and services run in sessions of their own and
    would hold the hub's ports (`up` then refuses to start): they are killed the same way, as a supervisor that
    restarts a crashed hub does. User servers run on."""
    before = hub.own_processes()
    os.killpg(hub.proc.pid, signal.SIGKILL)
    hub.proc.wait(30)
    procs = processes.table()
    servers_ = {q.pid for q in procs.values() if "singleuser" in q.cmdline}  # (however the server is launched)
    left = [
        p
        for p in processes.alive([q.key for q in before + hub.own_processes()])
        if not processes.has_ancestor(p, servers_, procs)
    ]
    for p in left:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not processes.alive([p.key for p in left]), 10, "the crashed hub's proxy and services to end")


def restart(hub, how: str) -> None:
    """Stop the hub (SIGTERM, or kill -9 as a crash does) and start it again; return once the new hub process has
    reconciled its jobs with the service."""
    before = reconciliations(hub)
    if how == "kill9":
        crash(hub)
    else:
        hub.stop()
    hub.start()
    wait_for(lambda: reconciliations(hub) > before, 60, "the restarted hub to reconcile its spalloc jobs")


def servers(admin) -> dict[str, dict]:
    """user -> default server model (ready / pending / state), for users that have one."""
    return {u["name"]: u["servers"][""] for u in admin.api("GET", "/users").json() if "" in u.get("servers", {})}


def live_jobs(double: SpallocDouble) -> list[dict]:
    return [j for j in double.jobs() if j["state"] != "DESTROYED"]


def post_start(user) -> int:
    return user.api("POST", f"/users/{user.name}/server").status_code


def stop_everything(hub, admin) -> None:
    for name in servers(admin):
        admin.api("DELETE", f"/users/{name}/server")
    wait_for(lambda: not servers(admin), 120, "every server to stop")


def problems(admin, double) -> dict[str, list]:
    """The invariants a user or operator would notice, now."""
    found: dict[str, list] = collections.defaultdict(list)
    models = servers(admin)
    jobs = live_jobs(double)
    by_owner = collections.defaultdict(list)
    for j in jobs:
        by_owner[j["owner"]].append(j)
    for owner, js in by_owner.items():
        if len(js) > 1:
            found["user_with_two_jobs"].append((owner, [j["id"] for j in js]))
    for name, m in models.items():
        if m.get("ready") and not m.get("pending"):
            b = (m.get("state") or {}).get("spinnaker") or {}
            ids = [j["id"] for j in by_owner.get(name, []) if j["state"] == "READY"]
            if b.get("job_id") not in ids:
                found["running_server_without_its_job"].append((name, b.get("job_id"), ids))
    for j in jobs:
        if j["owner"] not in models:
            found["job_without_server"].append((j["owner"], j["id"], j["state"]))
    return found


def settle(admin, double, timeout: float = SETTLE) -> dict[str, list]:
    """Problems that last: what is still wrong after `timeout` seconds (transitions take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        found = problems(admin, double)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


class TwoJobsWatch(threading.Thread):
    """Samples the service all along: no owner may ever have two live jobs, not even for a moment."""

    def __init__(self, double: SpallocDouble) -> None:
        super().__init__(daemon=True)
        self.double, self.seen, self.stop_event = double, set(), threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            owners = collections.defaultdict(list)
            for j in live_jobs(self.double):
                owners[j["owner"]].append(j["id"])
            for owner, ids in owners.items():
                if len(ids) > 1:
                    self.seen.add((owner, tuple(sorted(ids))))

    def finish(self) -> set:
        self.stop_event.set()
        self.join(5)
        return self.seen


# -------------------------------------------------------------------------------------------------- the tests
def test_a_claim_waiting_in_the_queue_is_given_back_when_the_hub_is_killed(hub, people, double):
    ann, ben, cat, admin = people["chann"], people["chben"], people["chcat"], people["admin"]
    ann.start_server()
    ben.start_server()  # both boards taken
    held = {j["owner"]: j for j in live_jobs(double)}
    assert set(held) == {"chann", "chben"} and all(j["state"] == "READY" for j in held.values())
    assert post_start(cat) == 202
    double.wait_for(
        lambda d: [j for j in live_jobs(d) if j["owner"] == "chcat" and j["state"] == "QUEUED"],
        timeout=30,
        what="cat's claim to wait in the queue",
    )
    [queued] = [j for j in live_jobs(double) if j["owner"] == "chcat"]
    kept_alive = {owner: double.job(job["id"])["keepalives"] for owner, job in held.items()}

    restart(hub, "kill9")
    # Given back by the restarted hub at once, not by the service's keepalive expiry (120 s after the crash).
    double.wait_for(
        lambda d: d.job(queued["id"])["state"] == "DESTROYED",
        timeout=SETTLE,
        what="cat's orphaned job to be given back",
    )
    gone = double.job(queued["id"])
    assert "the hub restarted and no server of it holds this job" in gone["reason"], gone
    assert f"jobs/{queued['id']} of chcat" in hub.log()  # one log line per job, naming it and its owner
    wait_for(lambda: "chcat" not in servers(admin), 30, "cat's interrupted start to be cleared")
    # The running servers keep their jobs: the restarted hub keeps them alive (no second job).
    for owner, job in held.items():
        n = kept_alive[owner]
        double.wait_for(
            lambda d: d.job(job["id"])["keepalives"] > n,
            timeout=SETTLE,
            what=f"the restarted hub to keep {owner}'s job alive",
        )
        assert double.job(job["id"])["state"] == "READY"
    assert not settle(admin, double)
    stop_everything(hub, admin)
    assert live_jobs(double) == []


def test_a_job_the_hub_asked_for_but_never_heard_of_is_given_back(hub, people, double):
    """The crash window: the service made the job, the hub was killed before its answer arrived."""
    dan, admin = people["chdan"], people["admin"]
    double.hold_create_answers()
    try:
        assert post_start(dan) == 202
        made = double.wait_for(
            lambda d: [j for j in live_jobs(d) if j["owner"] == "chdan"],
            timeout=30,
            what="the service to make dan's job",
        )
        restart_started = time.monotonic()
        crash(hub)
    finally:
        double.release_create_answers()
    before = reconciliations(hub)
    hub.start()
    wait_for(lambda: reconciliations(hub) > before, 60, "the restarted hub to reconcile its spalloc jobs")
    double.wait_for(
        lambda d: d.job(made[0]["id"])["state"] == "DESTROYED",
        timeout=SETTLE,
        what="dan's unrecorded job to be given back",
    )
    assert time.monotonic() - restart_started < KEEPALIVE
    assert "stopped before it could record the job" in double.job(made[0]["id"])["reason"]
    wait_for(lambda: "chdan" not in servers(admin), 30, "dan's interrupted start to be cleared")
    assert not settle(admin, double)


def test_seeded_chaos_leaves_no_job_without_a_server(hub, people, double):
    n_ops = int(os.environ.get("CHAOS_OPS", "40"))
    seed = int(os.environ.get("CHAOS_SEED", "11"))
    rng = random.Random(seed)
    admin = people["admin"]
    ops = collections.Counter()
    violations: dict[str, list] = collections.defaultdict(list)
    watch = TwoJobsWatch(double)
    watch.start()
    t0 = time.monotonic()
    try:
        for step in range(n_ops):
            models = servers(admin)
            have = [u for u in USERS if u in models]
            free = [u for u in USERS if u not in models]
            kind = rng.choices(
                ["start", "stop", "kill-server", "sigterm-hub", "kill9-hub"], weights=[40, 20, 15, 12, 13]
            )[0]
            if kind == "start" and not free or kind in ("stop", "kill-server") and not have:
                kind = "stop" if kind == "start" else "start"  # (the op that applies to someone)
            name = rng.choice(free if kind == "start" else have) if kind in ("start", "stop", "kill-server") else ""
            if kind == "start":
                post_start(people[name])
            elif kind == "stop":
                admin.api("DELETE", f"/users/{name}/server")
            elif kind == "kill-server":
                pid = ((models.get(name) or {}).get("state") or {}).get("pid")
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            else:
                waiting = [j for j in live_jobs(double) if j["state"] in ("QUEUED", "POWER")]
                ops[f"{kind} while a claim waited"] += bool(waiting)
                restart(hub, "sigterm" if kind == "sigterm-hub" else "kill9")
            ops[kind] += 1
            for k, found in settle(admin, double).items():
                violations[k].append({"step": step, "op": kind, "user": name, "found": found})
        stop_everything(hub, admin)
        for k, found in settle(admin, double).items():
            violations[k].append({"step": "end", "found": found})
        if live_jobs(double):
            violations["job_left_after_all_servers_stopped"].append(live_jobs(double))
        if RECONCILE_FAILED in hub.log():
            violations["reconciliation_failed"].append(hub.log().count(RECONCILE_FAILED))
    finally:
        for owner, ids in watch.finish():
            violations["user_ever_held_two_jobs"].append({"owner": owner, "jobs": ids})
    summary = {
        "seed": seed,
        "operations": n_ops,
        "by_operation": dict(ops),
        "seconds": round(time.monotonic() - t0, 1),
        "jobs_created": len(double.jobs()),
        "violations": {k: len(v) for k, v in violations.items()},
        "details": {k: v[:5] for k, v in violations.items()},
    }
    from conftest import ROOT

    out = ROOT / "tests" / "artifacts" / "board-chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, default=str))
    assert not violations, summary
