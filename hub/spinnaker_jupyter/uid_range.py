"""The uids of the deployment's system accounts (``spawner.local.uid_range``): which one a new account takes, how
many are left, and whether a range suits this machine (clear of its system, login, subordinate and systemd uids).

A uid is never given twice: a new account takes the lowest uid of the range that no account and no group has, and a
removed user's account is retired (renamed, locked), never deleted, so its uid stays taken. usernames.py makes the
accounts.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Iterable, Mapping
from pathlib import Path

#: spawner.local.uid_range's default: above 16-bit uids (65535) and systemd's dynamic service users, below the
#: subordinate uids useradd gives login accounts for their containers (SUB_UID_MIN 100000): 30 000 accounts.
DEFAULT_UID_RANGE = (70000, 99999)
#: Above this, some programs read uid_t as a negative number.
UID_MAX_ALLOWED = 2**31 - 1
#: "16-bit (uid_t) -1": never given, old programs read it as "no uid".
_NO_UID_16 = 65535
#: Ranges systemd hands out at run time without a passwd entry (https://systemd.io/UIDS-GIDS/): an account of ours
#: there could share its uid with a service or a container that next_uid cannot see.
_SYSTEMD_RANGES = (
    ("systemd's dynamic service users (DynamicUser=)", 61184, 65519),
    ("systemd's container uid ranges", 524288, 1879048191),
)
#: shadow's own defaults for keys missing from /etc/login.defs.
_LOGIN_DEFS_DEFAULTS = {
    "UID_MIN": 1000,
    "UID_MAX": 60000,
    "GID_MIN": 1000,
    "GID_MAX": 60000,
    "SUB_UID_MIN": 100000,
    "SUB_UID_MAX": 600100000,
    "SUB_UID_COUNT": 65536,
    "SUB_GID_MIN": 100000,
    "SUB_GID_MAX": 600100000,
    "SUB_GID_COUNT": 65536,
}


def next_uid(taken: Iterable[int], uid_range: tuple[int, int] | list[int]) -> int | None:
    """The uid of a new account: the lowest of ``uid_range`` (both ends included) not in ``taken`` (every uid and
    gid on the machine, :func:`taken_ids`), so the account's group gets the same number as gid. A removed user's account is retired, not deleted, so its uid stays taken: no uid is given twice.
    None: the range is full."""
    lo, hi = uid_range
    used = {i for i in taken if lo <= i <= hi}
    used.add(_NO_UID_16)
    # at most len(used) + 1 steps: the first number not used
    return next((uid for uid in range(lo, min(hi, lo + len(used)) + 1) if uid not in used), None)


def uids_left(taken: Iterable[int], uid_range: tuple[int, int] | list[int]) -> int:
    """How many new accounts ``uid_range`` still has room for (``taken``: as for :func:`next_uid`)."""
    lo, hi = uid_range
    used = {i for i in taken if lo <= i <= hi}
    if lo <= _NO_UID_16 <= hi:
        used.add(_NO_UID_16)
    return hi - lo + 1 - len(used)


def taken_ids() -> set[int]:
    """Every uid and gid of this machine's accounts and groups (retired ones included)."""
    return {pw.pw_uid for pw in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


class UidRangeFull(RuntimeError):
    """No uid of the deployment's range is left for a new account."""

    def __init__(self, account: str, hub_user: str, uid_range: tuple[int, int]) -> None:
        self.account, self.hub_user, self.uid_range = account, hub_user, uid_range
        super().__init__(self.message("server"))

    def message(self, what: str) -> str:
        """The operator's line, for the user's ``what`` ("server", "jobs")."""
        lo, hi = self.uid_range
        return (
            f"No uid is left for {self.hub_user}'s new system account {self.account}: all {hi - lo + 1} uids of "
            f"spawner.local.uid_range [{lo}, {hi}] are taken (a removed user's uid is never given again), so "
            f"{self.hub_user}'s {what} cannot start. The operator sets a larger spawner.local.uid_range in the config "
            "(`spinnaker-jupyter check` validates it) and restarts the hub."
        )


def parse_login_defs(text: str) -> dict[str, int]:
    """The numeric settings of a login.defs file (``KEY value`` lines; # comments)."""
    found = {}
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 2 and parts[1].isdigit():
            found[parts[0]] = int(parts[1])
    return found


def parse_subid(text: str) -> list[tuple[int, int]]:
    """The ranges of an /etc/subuid or /etc/subgid file (``owner:first:count`` lines), as (first, last)."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) > 0:
            found.append((int(parts[1]), int(parts[1]) + int(parts[2]) - 1))
    return found


def uid_range_problem(
    uid_range: list[int] | tuple[int, int],
    in_login_range: bool,
    login_defs: Mapping[str, int],
    subids: Iterable[tuple[int, int]] = (),
) -> str | None:
    """Why ``uid_range`` does not suit a machine with these ``login_defs`` (:func:`parse_login_defs`) and
    allocated subordinate ids (:func:`parse_subid`): one line for the operator, or None."""
    lo, hi = uid_range
    key = f"spawner.local.uid_range [{lo}, {hi}]"
    hint = f"(default [{DEFAULT_UID_RANGE[0]}, {DEFAULT_UID_RANGE[1]}])"
    defs = {**_LOGIN_DEFS_DEFAULTS, **login_defs}
    if not lo < hi:
        return f"{key}: the first uid must be smaller than the last"
    if not 0 < hi <= UID_MAX_ALLOWED:
        return f"{key}: uids end at {UID_MAX_ALLOWED} (2^31 - 1)"
    sys_max = max(defs.get("SYS_UID_MAX", defs["UID_MIN"] - 1), defs.get("SYS_GID_MAX", defs["GID_MIN"] - 1))
    if lo <= sys_max:
        return (
            f"{key} reaches into this machine's system uids (up to {sys_max}, SYS_UID_MAX in /etc/login.defs), which "
            f"the OS's own services take: start it above {sys_max} {hint}"
        )
    login_lo, login_hi = min(defs["UID_MIN"], defs["GID_MIN"]), max(defs["UID_MAX"], defs["GID_MAX"])
    if not in_login_range and lo <= login_hi and login_lo <= hi:
        return (
            f"{key} overlaps the uids of this machine's login accounts ({login_lo}-{login_hi}, UID_MIN-UID_MAX in "
            f"/etc/login.defs), where useradd puts people's own accounts: choose a range outside it {hint}, or set "
            "spawner.local.uid_range_in_login_range: true if the two may share it"
        )
    subs = list(subids)
    for kind in ("UID", "GID"):
        if defs[f"SUB_{kind}_COUNT"] > 0:
            subs.append((defs[f"SUB_{kind}_MIN"], defs[f"SUB_{kind}_MAX"]))
    for first, last in subs:
        if lo <= last and first <= hi:
            return (
                f"{key} overlaps subordinate uids ({first}-{last}: /etc/subuid, /etc/subgid, SUB_UID_MIN-SUB_UID_MAX "
                "in /etc/login.defs) given to login accounts for their containers, whose users could then own this "
                f"deployment's files: choose a range outside them {hint}"
            )
    for what, first, last in _SYSTEMD_RANGES:
        if lo <= last and first <= hi:
            return f"{key} overlaps {what} ({first}-{last}), taken at run time with no account: choose another {hint}"
    return None


def machine_uid_range_problem(uid_range: list[int] | tuple[int, int], in_login_range: bool) -> str | None:
    """:func:`uid_range_problem` on this machine (/etc/login.defs, /etc/subuid, /etc/subgid)."""

    def read(path: str) -> str:
        try:
            return Path(path).read_text(errors="replace")
        except OSError:
            return ""

    subids = parse_subid(read("/etc/subuid")) + parse_subid(read("/etc/subgid"))
    return uid_range_problem(uid_range, in_login_range, parse_login_defs(read("/etc/login.defs")), subids)


def uid_range_report(uid_range: list[int] | tuple[int, int]) -> str | None:
    """A line for `spinnaker-jupyter check` when few uids are left for new accounts (fewer than a tenth of the
    range, or than 100), else None."""
    lo, hi = uid_range
    size, left = hi - lo + 1, uids_left(taken_ids(), uid_range)
    if left >= max(size // 10, min(100, size)):
        return None
    if left == 0:
        return (
            f"accounts: no uid is left in spawner.local.uid_range [{lo}, {hi}]: new users' servers and jobs cannot "
            "start until it is made larger"
        )
    return (
        f"accounts: only {left} of the {size} uids of spawner.local.uid_range [{lo}, {hi}] are left for new users "
        "(removed users keep theirs): make the range larger before it runs out"
    )
