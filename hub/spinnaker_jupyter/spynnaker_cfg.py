"""The one sPyNNaker cfg a kernel sees, for every `spinnaker.mode`: built as data (sections -> items, with the file's
comments), rendered to text once.

| mode | [Machine] |
|---|---|
| `virtual` (and `session` before a board came) | `virtual_board = True` |
| `machine` | the lab's board: `machine_name` |
| `session`, boards claimed | the claimed root board's address; spalloc and BMP keys off (the hub holds the job) |
| `per-run` | `spalloc_server` and its keys: sPyNNaker claims boards itself at each setup() |

`spinnaker.extra_cfg` is laid over it, section by section. The text goes to a file every kernel reads
(`kernels.write_spynnaker_cfg`) or, for one server's claimed boards, into its environment (`SPINNAKER_MACHINE_CFG`,
boards/). sPyNNaker reads it with a RawConfigParser: values are literal (no `%` interpolation), one per line.

Standard library only, and nothing of this package: the CLI imports it at start-up (`spinnaker-jupyter check`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["Cfg", "CfgError", "ClaimedBoards", "HEADER", "build", "spalloc_server", "text"]

HEADER = "Written by spinnaker-jupyter from the deployment config; edits here are replaced at start-up."


class CfgError(ValueError):
    """A value that cannot go into the cfg; the message names the setting."""


@dataclass(frozen=True)
class ClaimedBoards:
    """Boards the hub claimed from the spalloc service for one user server (mode `session`)."""

    host: str  # the root board's address: sPyNNaker's machine_name
    version: int  # 5 for 48-chip boards (every spalloc machine), 3 for a 4-chip board
    job_url: str
    owner: str  # whose server, said in the file's first line
    boards: int = 1


@dataclass
class Cfg:
    """A cfg file: comment lines at the top, then sections of `key = value` items (in order)."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    def lay_over(self, extra: Mapping[str, Mapping[str, Any]]) -> None:
        """Add `extra`'s sections and keys, replacing values of keys already there (kept in place)."""
        for name, items in extra.items():
            self.sections.setdefault(name, {}).update(items)

    def render(self) -> str:
        lines = [f"# {c}" for c in self.comments]
        # DEFAULT first: where configparser writes it (its keys apply to every section whatever the order).
        for name in sorted(self.sections, key=lambda n: n != "DEFAULT"):
            lines.append(f"[{name}]")
            lines += [f"{key} = {_value(name, key, value)}" for key, value in self.sections[name].items()]
            lines.append("")
        return "\n".join(lines) + "\n"


def _value(section: str, key: str, value: Any) -> str:
    text = str(value)  # None -> "None", True -> "True": sPyNNaker's spelling
    if "\n" in text or "\r" in text:
        raise CfgError(
            f"sPyNNaker cfg [{section}] {key}: a value cannot span lines ({text[:60]!r}); "
            f"write it on one line (spinnaker.extra_cfg.{section}.{key})"
        )
    return text


def spalloc_server(url: str) -> str:
    """The allocation service URL as sPyNNaker's `spalloc_server` takes it (`https://host/spalloc/`), which is also
    the root the hub's spalloc client talks to. Accepts the REST root too (`.../spalloc/srv/spalloc/`); an http(s)
    URL is what selects the new (HTTP) spalloc in spinnman."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CfgError(
            f"The allocation service URL must be an http(s) URL such as "
            f"https://spinnaker.cs.man.ac.uk/spalloc/, not {url!r} (setting `spinnaker.spalloc.url`)."
        )
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    if path.endswith("/srv/spalloc/"):
        path = path[: -len("srv/spalloc/")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


# --- the [Machine] section of each mode ---------------------------------------------------------------------------
def _virtual(version: Any) -> dict[str, Any]:
    return {"version": version, "virtual_board": True}


def _lab_board(machine_name: str, version: Any) -> dict[str, Any]:
    return {"version": version, "machine_name": machine_name}


def _claimed(board: ClaimedBoards) -> dict[str, Any]:
    """The BMP and power keys keep the kernel's spinnman from switching boards the service controls; the spalloc
    keys off so it does not allocate again. For several boards spinnman discovers the others from the root."""
    return {
        "virtual_board": False,
        "machine_name": board.host,
        "version": board.version,
        "spalloc_server": None,
        "remote_spinnaker_url": None,
        "auto_detect_bmp": False,
        "reset_machine_on_startup": False,
        "turn_off_machine": False,
    }


def _per_run(spalloc: Mapping[str, Any], version: Any) -> dict[str, Any]:
    """`spalloc_group` and `spalloc_machine` are spinnman.cfg keys; `spalloc_use_proxy` reaches the boards through
    the service's websocket proxy (needed unless the kernel is on the boards' network). No cfg key names an EBRAINS
    collab: spinnman takes it from the notebook's folder (`.../shared/<collab>`) or NMPI_JOB_ID. The user's token
    reaches spinnman through the hub's access-token-service or OIDC_BEARER_TOKEN."""
    return {
        "virtual_board": False,
        "machine_name": None,
        "version": version,
        "spalloc_server": spalloc_server(spalloc["url"]),
        "spalloc_use_proxy": bool(spalloc["use_proxy"]),
        "spalloc_group": spalloc.get("group") or None,
        "spalloc_machine": spalloc.get("machine_name") or None,
        "remote_spinnaker_url": None,
    }


def build(spinnaker: Mapping[str, Any], *, mode: str | None = None, claimed: ClaimedBoards | None = None) -> Cfg:
    """The cfg of the `spinnaker:` config section in `mode` (default: its own), or of boards `claimed` for one
    server. `session` without a claim is virtual: a server's board comes with its environment."""
    mode = mode or spinnaker["mode"]
    comments = [HEADER]
    if claimed is not None:
        comments.insert(
            0,
            f"SpiNNaker board{'s' if claimed.boards > 1 else ''} claimed by the hub for "
            f"{claimed.owner}'s server: {claimed.job_url}",
        )
        machine = _claimed(claimed)
    elif mode == "per-run":
        machine = _per_run(spinnaker["spalloc"], spinnaker["version"])
    elif mode in ("virtual", "session"):
        machine = _virtual(spinnaker["version"])
    elif mode == "machine":
        machine = _lab_board(spinnaker["machine_name"], spinnaker["version"])
    else:
        raise CfgError(f"spinnaker.mode: {mode!r} is not one of virtual, machine, session, per-run")
    cfg = Cfg({"Machine": machine}, comments)
    cfg.lay_over(spinnaker.get("extra_cfg") or {})
    return cfg


def text(spinnaker: Mapping[str, Any], *, mode: str | None = None, claimed: ClaimedBoards | None = None) -> str:
    """`build(...)` rendered: the text a kernel reads."""
    return build(spinnaker, mode=mode, claimed=claimed).render()
