"""`spinnaker-jupyter boards`: the operator's view of what each user server holds.

While the hub runs it is asked through its REST API (``GET /hub/api/spinnaker/boards``, with the token of the
`course-manager` service, whose ``admin:servers`` covers ``admin:server_state``): only the hub knows whether it keeps
a job alive right now. While it is down, the servers' state is read from its database. The output says which.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..spalloc import SpallocError
from ..upstream import spawner_states
from .record import STATE_KEY


def held_boards(d) -> list[dict]:
    """Every server's SpiNNaker state, from the hub's database (works while the hub is down)."""
    import sqlalchemy as sa

    try:
        spawners = spawner_states(d.db_url)  # (JupyterHub's tables: upstream.py reads them)
    except sa.exc.OperationalError as e:
        from ..config import ConfigError

        raise ConfigError(f"cannot read the hub's database {d.db_url}: {e.orig}") from None
    return [
        {
            "user": user,
            "server": server,
            "running": running,
            "started": str(started) if started else None,
            **state[STATE_KEY],
        }
        for user, server, state, running, started in spawners
        if state.get(STATE_KEY)
    ]


def hub_boards(d) -> tuple[list[dict] | None, str]:
    """Every running server's boards from the running hub's REST API, and where they came from in words; None (and
    why) when the hub is not running or does not answer."""
    from ..account_removal import _hub_pid
    from ..config import ConfigError
    from ..course import token_path

    if _hub_pid(d) is None:
        return None, "the hub's database (the hub is not running)"
    path = token_path(d)
    url = f"http://127.0.0.1:{d['proxy']['hub_port']}{d['hub']['base_url']}hub/api/spinnaker/boards?live=0"
    if not path.exists():
        return None, f"the hub's database (the hub runs, but {path} is missing: restart the hub to read it live)"
    req = urllib.request.Request(url, headers={"Authorization": f"token {path.read_text().strip()}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read()), "the running hub (its REST API)"
    except urllib.error.HTTPError as e:
        if e.code == 403:
            raise ConfigError(
                f"the running hub refused the token in {path} (the hub was started before it "
                f"existed): restart the hub, then run `boards` again"
            ) from None
        return None, f"the hub's database (the running hub answered HTTP {e.code} at {url}; it may be behind)"
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        return None, f"the hub's database (the running hub did not answer at {url}: {why}; it may be behind)"


async def _live(d, held: list[dict]) -> tuple[dict, list[dict], str | None]:
    from ..spalloc import SpallocClient

    sp = d["spinnaker"]["spalloc"]
    client = SpallocClient(
        sp["url"], d.spalloc_token, retries=1, ca_certs=str(d.path(sp["ca_certs"], Path())) if sp["ca_certs"] else None
    )
    states: dict[str, Any] = {}
    others: list[dict] = []
    try:
        for b in held:
            if b.get("job_url"):
                try:
                    st = await client.job(b["job_url"]).status()
                    states[b["job_url"]] = f"{st.state.value}{f' ({st.reason})' if st.reason else ''}"
                except SpallocError as e:
                    states[b["job_url"]] = f"? ({e})"
        ours = {b.get("job_url") for b in held}
        for url in await client.list_jobs():
            if url not in ours:
                st = await client.job(url).status()
                others.append({"job_url": url, "owner": st.owner, "state": st.state.value})
        return states, others, None
    except SpallocError as e:
        return states, others, str(e)
    finally:
        await client.close()


def cli_boards(d, live: bool = False, as_json: bool = False) -> int:
    """`spinnaker-jupyter boards`: what each user server holds (the running hub's view, else its database), and with
    --live the service's view."""
    held, source = hub_boards(d)
    from_hub = held is not None
    if held is None:
        held = held_boards(d)
    states, others, error = {}, [], None
    if live:
        if not d["spinnaker"]["spalloc"]["url"]:
            error = "no spinnaker.spalloc.url configured"
        else:
            states, others, error = asyncio.run(_live(d, held))
    if as_json:
        print(
            json.dumps(
                {
                    "source": "hub" if from_hub else "database",
                    "read_from": source,
                    "servers": [{**b, "live": states.get(b.get("job_url"))} for b in held],
                    "other_jobs": others,
                    "live_error": error,
                },
                indent=1,
            )
        )
        return 0
    print(f"SpiNNaker mode: {d['spinnaker']['mode']}; servers holding or recorded with boards: {len(held)}")
    print(f"  (read from {source})")
    for b in held:
        who = f"{b['user']}{'/' + b['server'] if b['server'] else ''}"
        running = "running" if b["running"] else "stopped"
        if b.get("fallback"):
            what = f"no board ({b['fallback']} mode): {b.get('notice', '')}"
        elif b.get("job_url"):
            what = (
                f"board {b.get('board', '?')} ({b.get('boards', 1)} board(s)), job {b.get('job_id')}, "
                f"claimed {b.get('claimed_at', '?')}"
            )
            if b.get("lost"):
                what += f"; LOST at {b.get('lost_at')}: {b['lost']}"
            elif b.get("keepalive"):  # (only the running hub knows)
                what += f"; keepalive {b['keepalive']}"
            if live:
                what += f"; at the service now: {states.get(b['job_url'], '?')}"
        elif b.get("mode") == "machine":
            what = f"lab board {b.get('board')}{' (held)' if b.get('held') else ''}"
        else:
            what = f"mode {b.get('mode')}"
        print(f"  {who:<24} {running:<8} {what}")
    if live:
        if error:
            print(f"  (the allocation service: {error})")
        for o in others:
            print(f"  service job {o['job_url']} of {o['owner']}: {o['state']} (not held by a server of this hub)")
    return 0
