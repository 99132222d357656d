"""The `spinnaker:` section applied to JupyterHub's config, and the lease reconciliation at hub start."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from .. import leases
from ..spalloc import SpallocAllocator
from ..upstream import add_hub_handlers
from .admin import held_boards
from .handlers import handlers
from .lock import use_deployment
from .mixin import section_traits


def status_command_dir(d) -> Path | None:
    """A folder holding only `spinnaker-status` (linked from the hub environment), for local servers' PATH."""
    script = Path(sys.executable).parent / "spinnaker-status"
    if not script.exists():
        return None
    folder = d.data_dir / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    link = folder / "spinnaker-status"
    if not (link.is_symlink() and os.readlink(link) == str(script)):
        tmp = folder / ".spinnaker-status.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(script)
        os.replace(tmp, link)
    return folder


LEASE_FILE = "spinnaker-leases.sqlite"
_RECONCILE: asyncio.Task | None = None  # (referenced so the task is not collected while it runs)


def _running_server_jobs(d) -> set[str]:
    """Job URLs held by servers the hub database records as running (their spawners resume or release them)."""
    return {
        b["job_url"]
        for b in held_boards(d)
        if b["running"] and b.get("job_url") and not b.get("released") and not b.get("lost")
    }


async def reconcile_at_start(c, d) -> leases.ReconcileReport | None:
    """At hub start: give back the spalloc jobs the last hub process recorded and no server holds now."""
    from traitlets.log import get_logger

    log = get_logger()
    allocator = SpallocAllocator(config=c, log=log)
    try:
        store = leases.open_store(d.hub_dir / LEASE_FILE)
        loop = asyncio.get_running_loop()
        running: set[str] | None = None

        async def is_held(lease: leases.Lease) -> bool:
            nonlocal running
            if running is None:  # read once: the dead process's last word on which servers run with which job
                running = await loop.run_in_executor(None, _running_server_jobs, d)
            return lease.job_url in running

        return await leases.reconcile(store, allocator.client(), is_held=is_held, log=log)
    except Exception:  # noqa: BLE001 - never stop the hub for this; the service's keepalive expiry still applies
        log.exception("SpiNNaker jobs: reconciliation with the allocation service failed")
        return None
    finally:
        await allocator.close()


def configure_hub(c, d) -> None:
    """Apply `spinnaker:` (and `spawner.poll_interval`) to JupyterHub's config `c`."""
    sp = d["spinnaker"]
    for trait, value in section_traits(sp).items():  # one typed trait per key (mixin.SECTION_KEYS)
        setattr(c.BoardsMixin, trait, value)
    c.Spawner.poll_interval = d["spawner"]["poll_interval"]
    if sp["mode"] in ("machine", "session"):
        # The wait for a board comes on top of the server's own start-up time.
        c.Spawner.start_timeout = d["hub"]["start_timeout"] + sp["claim_timeout"]
    if sp["mode"] == "machine":
        use_deployment(d)  # the lab board's lock: a file shared with the job service (lock.py)
    spalloc = sp["spalloc"]
    if spalloc["url"]:
        a = c.SpallocAllocator
        a.url = spalloc["url"]
        a.keepalive_interval = float(spalloc["keepalive_interval"])
        a.claim_timeout = float(sp["claim_timeout"])
        a.boards = spalloc["boards"]
        a.machine_name = spalloc["machine_name"]
        a.tags = spalloc["tags"]
        a.group = spalloc["group"]
        if spalloc["ca_certs"]:
            a.ca_certs = str(d.path(spalloc["ca_certs"], Path()))
        if sp["mode"] == "session":
            a.token_provider = d.spalloc_token  # read again at each session renewal (a rotated token file works)
            c.BoardsMixin.lease_store = str(d.hub_dir / LEASE_FILE)
            try:
                loop = asyncio.get_running_loop()  # (the hub loads its config on its running loop)
            except RuntimeError:
                loop = None  # (a config check, or a test applying the config: nothing to reconcile)
            if loop is not None:
                global _RECONCILE
                _RECONCILE = loop.create_task(reconcile_at_start(c, d))
    if sp["mode"] == "per-run":
        hub = d["hub"]
        host = hub["ip"] if hub["ip"] not in ("", "0.0.0.0", "::") else "127.0.0.1"
        c.BoardsMixin.service_env = {"JUPYTERHUB_SERVICE_HOST": host, "JUPYTERHUB_SERVICE_PORT": str(hub["port"])}
    if d["spawner"]["type"] == "local":
        folder = status_command_dir(d)
        if folder:
            c.BoardsMixin.path_append = [str(folder)]
    add_hub_handlers(c, handlers())  # deprecated JupyterHub.extra_handlers, and why: upstream.py
