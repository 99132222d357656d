"""The job service process (hub-managed: `python -m spinnaker_jupyter.jobs.service`): the nmpi API at the root of
its own address and the runner, in one process. It reads the same deployment config as the hub
(SPINNAKER_JUPYTER_CONFIG) and talks to the hub with its service token (JUPYTERHUB_API_URL / _TOKEN).

At start-up, jobs a previous run left `running` are stopped and put back in the queue with a note; at a clean stop
(SIGTERM / SIGINT, as the hub sends) running jobs are stopped, noted and put back in the queue the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal

from . import api, identity, pages, signing
from .executor import LocalExecutor
from .job_boards import JobBoards
from .per_run import PerRun
from .runner import Runner
from .settings import SERVICE_NAME, Settings, db_url, load_deployment
from .store import Store

log = logging.getLogger("spinnaker_jupyter.jobs")


def ebrains_settings(d) -> dict | None:
    if d["auth"]["type"] != "ebrains":
        return None
    eb = dict(d["auth"]["ebrains"])
    keycloak = eb["issuer"].rstrip("/") + "/protocol/openid-connect"
    eb["userinfo_url"] = eb["userinfo_url"] or f"{keycloak}/userinfo"
    return eb


async def serve() -> None:
    os.umask(0o077)  # the store, logs, outputs and key are the service's alone; what users need is chmod-ed
    d = load_deployment()
    s = Settings.from_deployment(d)
    s.data.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(db_url(d))
    sp = d["spawner"]
    # Jobs never run as root: as root, each user's jobs run as their own account, whatever the spawner does with
    # servers (a container spawner, or spawner.local.system_users: false); otherwise as the service's account.
    executor = LocalExecutor(
        d.homes_dir,
        os.geteuid() == 0,
        sp["local"]["system_user_prefix"],
        sessions_dir=s.sessions,
        uid_range=sp["local"]["uid_range"],
    )
    if d["jobs"]["executor"] == "slurm":  # the same accounts; the command runs as a Slurm job (slurm_executor.py)
        from .slurm_executor import SlurmExecutor

        executor = SlurmExecutor.for_deployment(d, s, store, executor)
    elif d["jobs"]["executor"] == "docker":  # the same accounts; a container per job (docker_executor.py)
        from .docker_executor import DockerExecutor

        executor = DockerExecutor.for_deployment(d, s, store, executor)
    boards = JobBoards.from_deployment(d)  # spinnaker.mode for jobs too (job_boards.py)
    runner = Runner(store, executor, s, boards, PerRun.from_deployment(d, os.environ))  # per-run: owners' tokens
    back = runner.recover()
    # The boards of jobs a killed runner held (those jobs are back in the queue); new claims meanwhile are this
    # process's rows, which it does not touch.
    reconciling = asyncio.create_task(boards.reconcile())
    if back:
        log.warning("Put %d interrupted job(s) back in the queue: %s", len(back), back)
    checker = identity.TokenChecker(
        os.environ["JUPYTERHUB_API_URL"],
        os.environ.get("JUPYTERHUB_SERVICE_NAME", SERVICE_NAME),
        ebrains_settings(d),
        d["jobs"]["token_cache_seconds"],
    )
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")  # the Jobs page, behind the hub's login (pages.py)
    web_pages = (
        {
            "pages": pages.routes(prefix),
            "pages_prefix": prefix,
            "template_path": str(pages.TEMPLATES),
            "hub_prefix": prefix.rsplit("services/", 1)[0] + "hub/",
            "xsrf_cookies": True,
            "cookie_secret": secrets.token_bytes(32),
        }
        if prefix
        else {}
    )
    if runner.per_run is not None:  # the jobs' own token requests, and the access-token-service's check (per_run.py)
        web_pages["pages"] = [*web_pages.get("pages", []), *runner.per_run.routes(store)]
    app = api.make_app(
        **web_pages,
        store=store,
        jobs=s,
        checker=checker,
        runner=runner,
        versions=runner.versions,
        signing_key=signing.load_key(s.data / "signing_key"),
    )
    server = app.listen(d["jobs"]["port"], d["jobs"]["ip"], xheaders=True)
    log.info(
        "Job service listening on %s:%s (public URL %s); runner %s, concurrency %d",
        d["jobs"]["ip"],
        d["jobs"]["port"],
        s.base_url,
        runner.id,
        s.concurrency,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    queue = asyncio.create_task(runner.loop())
    await stop.wait()
    log.info("Stopping: running jobs go back in the queue")
    server.stop()
    await runner.stop()
    queue.cancel()
    await asyncio.gather(reconciling, return_exceptions=True)
    await boards.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s jobs] %(message)s")
    asyncio.run(serve())


if __name__ == "__main__":
    main()
