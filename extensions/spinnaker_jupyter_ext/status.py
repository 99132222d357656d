"""`spinnaker-status`: which SpiNNaker machine this server's sPyNNaker kernels use, and how it stands now.

Two sources, both said for what they are:
* this server's environment, fixed when the server started: the mode, the sPyNNaker cfg the kernels get
  ($SPINNAKER_MACHINE_CFG), the board and spalloc job claimed for it, or why there is none;
* the hub, asked now (`GET $JUPYTERHUB_API_URL/spinnaker/boards/<user>/<server>` with the server's own token):
  whether the hub still keeps the job alive, and the job's state at the allocation service right now.

Exit status: 0 when the kernels have what the server was started with; 1 when this server's board is gone (restart
the server for a new one); 2 when the hub could not be asked.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

from spinnaker_server_contract import CFG_NAME, ServerContract, own_cfgs


def local_info(env=os.environ) -> dict:
    """What the server was started with (its environment)."""
    told = ServerContract.from_env(env)
    text = told.machine_cfg
    source = f"this server's environment ({ServerContract.variable('machine_cfg')})"
    if not text and told.cfg_dir:
        path = os.path.join(told.cfg_dir, CFG_NAME)
        source = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            text = ""
    machine: dict = {}
    if text:
        parser = configparser.ConfigParser()
        try:
            parser.read_string(text)
            machine = dict(parser["Machine"]) if parser.has_section("Machine") else {}
        except configparser.Error:
            machine = {}
    info = {
        "mode": told.mode or ("virtual" if machine.get("virtual_board") == "True" else None),
        "board": told.board,
        "job_id": told.board_job,
        "job_url": told.board_job_url,
        "notice": told.board_notice,
        "problems": list(told.problems),  # what the hub said that could not be read
        "cfg_source": source if text else None,
        "cfg_machine": {k: v for k, v in machine.items() if v not in ("None", "")},
        "own_cfg": (own_cfgs(os.path.expanduser("~")) or [None])[0],
    }
    return info


def ask_hub(env=os.environ, timeout: float = 20.0) -> tuple[dict | None, str | None]:
    """The hub's view now, or (None, why not)."""
    api, token, user = env.get("JUPYTERHUB_API_URL"), env.get("JUPYTERHUB_API_TOKEN"), env.get("JUPYTERHUB_USER")
    if not (api and token and user):
        return None, "not running inside a JupyterHub server (no JUPYTERHUB_API_URL/TOKEN/USER)"
    url = f"{api.rstrip('/')}/spinnaker/boards/{quote(user, safe='')}/{quote(env.get('JUPYTERHUB_SERVER_NAME', ''), safe='')}"
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode()), None
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:200]
        return None, f"the hub answered HTTP {e.code} ({detail})"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"the hub could not be asked ({getattr(e, 'reason', e)})"


def describe(info: dict, hub: dict | None, hub_error: str | None) -> tuple[list[str], int]:
    """Lines for people, and the exit status."""
    mode = (hub or {}).get("mode") or info["mode"] or "unknown"
    m = info["cfg_machine"]
    lines = [
        f"SpiNNaker for this server ({os.environ.get('JUPYTERHUB_USER', '?')}"
        f"{'/' + os.environ['JUPYTERHUB_SERVER_NAME'] if os.environ.get('JUPYTERHUB_SERVER_NAME') else ''})"
    ]
    status = 0
    notice = (hub or {}).get("notice") or info["notice"]
    if notice:
        lines.append(f"  board:    none. {notice}")
    elif mode == "session":
        board = (hub or {}).get("board") or info["board"] or m.get("machine_name")
        n = (hub or {}).get("boards")
        lines.append(
            f"  board:    {board} (version {m.get('version', '?')}{f', {n} boards' if n and n > 1 else ''}), "
            f"claimed by the hub for this server"
        )
        job_id = (hub or {}).get("job_id") or info["job_id"]
        job_url = (hub or {}).get("job_url") or info["job_url"]
        claimed = (hub or {}).get("claimed_at")
        lines.append(f"  job:      {job_id} ({job_url}){f', claimed {claimed}' if claimed else ''}")
    elif mode == "machine":
        lines.append(f"  board:    {m.get('machine_name')} (the lab's board; yours until this server stops)")
    elif mode == "per-run":
        lines.append(
            f"  boards:   claimed by sPyNNaker itself at each setup() from {m.get('spalloc_server')}"
            f"{' (group ' + m['spalloc_group'] + ')' if m.get('spalloc_group') else ''}, with your "
            f"login's token, and released at end()"
        )
    elif mode == "virtual":
        lines.append(
            "  board:    none: virtual mode. run() maps and loads your network; recorded data come back empty."
        )
    lines.insert(1, f"  mode:     {mode}")
    if hub is None:
        lines.append(f"  live:     unknown: {hub_error}")
        status = 2
    elif hub.get("lost"):
        lines.append(
            f"  state:    GONE: the allocation service ended job {hub.get('job_id')}: {hub['lost']} "
            f"(at {hub.get('lost_at')}). Your kernels cannot use this board any more: stop and start "
            f"your server (File > Hub Control Panel) to get a new one."
        )
        status = 1
    elif hub.get("job_url"):
        live = hub.get("live")
        if live:
            state = live["state"]
            lines.append(
                f"  state:    {state} at the allocation service (asked just now); the hub's keepalive is "
                f"{hub.get('keepalive', 'unknown')}"
            )
            if state != "READY":
                status = 1
        else:
            lines.append(
                f"  state:    unknown now ({hub.get('live_error', 'not asked')}); the hub's keepalive is "
                f"{hub.get('keepalive', 'unknown')}"
            )
    if info["own_cfg"]:
        lines.append(
            f"  NOTE:     your own {info['own_cfg']} is what sPyNNaker kernels use, not the above. "
            f"Rename it to use this service's machine."
        )
    elif info["cfg_source"]:
        lines.append(f"  cfg:      kernels get the one sPyNNaker cfg from {info['cfg_source']}")
    lines += [f"  PROBLEM:  {p}" for p in info.get("problems", [])]
    return lines, status


def drive_line(lines: list[str]) -> dict | None:
    """The EBRAINS Drive mount's state as this server's drive keeper last wrote it (drive.py), added to ``lines``."""
    if ServerContract.from_env().drive is None:
        return None
    from spinnaker_jupyter_ext.drive import read_state

    state = read_state()
    if state is None:
        lines.append("  drive:    EBRAINS Drive: not checked yet (the server is starting)")
    elif state.get("state") == "mounted":
        lines.append(f"  drive:    EBRAINS Drive mounted at {state.get('mount_point')} (since {state.get('since')})")
    else:
        lines.append(
            f"  drive:    EBRAINS Drive NOT AVAILABLE at {state.get('mount_point')}: {state.get('reason')} "
            f"(since {state.get('since')}; retried by itself)"
        )
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="spinnaker-status",
        description="Show the SpiNNaker machine this server's "
        "sPyNNaker kernels use, and its state now (asked through the hub).",
    )
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    ap.add_argument("--no-live", action="store_true", help="only what the server was started with; ask nobody")
    args = ap.parse_args(argv)
    info = local_info()
    hub, error = (None, "not asked (--no-live)") if args.no_live else ask_hub()
    lines, status = describe(info, hub, error)
    drive = drive_line(lines)
    if args.no_live and status == 2:
        status = 0
    if args.json:
        print(json.dumps({"server": info, "hub": hub, "hub_error": error, "status": status, "drive": drive}, indent=1))
    else:
        print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
