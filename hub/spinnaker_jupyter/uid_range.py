"""The uids of the deployment's system accounts (``spawner.local.uid_range``): which one a new account takes, how
many are left, and whether a range suits this machine (clear of its system, login, subordinate and systemd uids).

A uid is never given twice, not even one an account deleted by hand (``userdel``) freed, whose files (homes, backups,
job folders, Slurm nodes' disks) the next owner of the uid would own: the deployment remembers the highest uid it ever
gave (the high-water mark, ``data_dir/hub/uid-high-water``) and a new account takes the lowest uid above it that no
account and no group has. A deployment from before the mark starts from the highest uid of an account in the range.
The range is full once no uid above the mark is free, even with lower ones free (they may have been given before).
The mark is a file beside the hub database rather than a row in it: the hub and the job service (two processes that
share data_dir, not memory) both make accounts and take turns on its lock; JupyterHub's tables stay upstream's; and
backup/restore carry it with the hub folder. usernames.py makes the accounts.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import tempfile
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


def next_uid(taken: Iterable[int], uid_range: tuple[int, int] | list[int], above: int | None = None) -> int | None:
    """The uid of a new account: the lowest of ``uid_range`` (both ends included) above ``above`` (the high-water
    mark, :func:`high_water`) not in ``taken`` (every uid and gid on the machine, :func:`taken_ids`), so the account's
    group gets the same number as gid. None: the range is full."""
    lo, hi = uid_range
    lo = lo if above is None else max(lo, above + 1)
    used = {i for i in taken if lo <= i <= hi}
    used.add(_NO_UID_16)
    # at most len(used) + 1 steps: the first number not used
    return next((uid for uid in range(lo, min(hi, lo + len(used)) + 1) if uid not in used), None)


def uids_left(taken: Iterable[int], uid_range: tuple[int, int] | list[int], above: int | None = None) -> int:
    """How many new accounts ``uid_range`` still has room for (``taken``, ``above``: as for :func:`next_uid`)."""
    lo, hi = uid_range
    lo = lo if above is None else max(lo, above + 1)
    if lo > hi:
        return 0
    used = {i for i in taken if lo <= i <= hi}
    if lo <= _NO_UID_16 <= hi:
        used.add(_NO_UID_16)
    return hi - lo + 1 - len(used)


def taken_ids() -> set[int]:
    """Every uid and gid of this machine's accounts and groups (retired ones included)."""
    return {pw.pw_uid for pw in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}


#: The high-water mark's file in data_dir/hub (:func:`mark_file`): one decimal number, the highest uid ever given.
MARK_FILE = "uid-high-water"


def mark_file(data_dir: str | os.PathLike) -> Path:
    """Where the deployment with this ``data_dir`` keeps its high-water mark (beside the hub database)."""
    return Path(data_dir) / "hub" / MARK_FILE


def read_mark(path: Path) -> int | None:
    """The uid in the mark file; None when there is none yet (a deployment from before the mark, or a new one)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if not text.strip().isdigit():
        raise RuntimeError(
            f"{path} should hold one number, the highest uid this deployment ever gave its system accounts, but holds "
            f"{text[:40]!r}: write that uid into it (or remove the file to start again from the highest uid in use)"
        )
    return int(text)


def high_water(uid_range: tuple[int, int] | list[int], mark: int | None, account_uids: Iterable[int]) -> int:
    """The uid new accounts must be above: the ``mark`` (:func:`read_mark`) or the highest of ``account_uids`` in
    ``uid_range``, whichever is higher (so a deployment from before the mark, or an account made there by hand, is
    counted), else the uid before the range."""
    lo, hi = uid_range
    in_range = [u for u in account_uids if lo <= u <= hi]
    return max([lo - 1, *in_range, *([mark] if mark is not None else [])])


def current_mark(
    uid_range: tuple[int, int] | list[int],
    data_dir: str | os.PathLike | None,
    account_uids: Iterable[int] | None = None,
) -> int:
    """:func:`high_water` on this machine, for the deployment with this ``data_dir`` (None: the accounts alone);
    ``account_uids``: the machine's accounts' uids when the caller has read them already."""
    mark = read_mark(mark_file(data_dir)) if data_dir is not None else None
    uids = account_uids if account_uids is not None else (pw.pw_uid for pw in pwd.getpwall())
    return high_water(uid_range, mark, uids)


def _write_mark(path: Path, uid: int) -> None:
    """Replace the mark file atomically (a crash leaves the old mark or the new one, never half a number)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{uid}\n")
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # a number, no secret; its folder (data_dir/hub) is private anyway
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def give_uid(data_dir: str | os.PathLike, uid_range: tuple[int, int] | list[int]) -> int | None:
    """The uid of a new account of the deployment with this ``data_dir``: the lowest free one above the high-water
    mark, which is moved to it before the caller makes the account (a crash in between wastes one uid, never gives one
    twice). None: the range is full. The hub and the job service take turns (an flock beside the mark), so they never
    pick the same uid.

    The machine's accounts are read once and its groups not at all: a candidate is checked by number. Each pass over
    the whole account or group database holds the GIL the hub's event loop shares; reading both six times per uid
    cost 7.7 ms CPU per uid on a machine with ~1,500 of each, this 3.0 ms. Under the lock the mark is read again and
    the candidate checked again, so an account made meanwhile by another process (which moves the mark) or by hand,
    or a group, is still seen."""
    uids = [pw.pw_uid for pw in pwd.getpwall()]
    taken = set(uids)

    def free_uid() -> int | None:
        uid = next_uid(taken, uid_range, current_mark(uid_range, data_dir, uids))
        while uid is not None and _in_use(uid):  # a group's number, or made since the read above
            taken.add(uid)
            uid = next_uid(taken, uid_range, current_mark(uid_range, data_dir, uids))
        return uid

    if free_uid() is None:
        return None  # full (the mark only rises): said without touching data_dir
    path = mark_file(data_dir)
    try:
        fd = os.open(path.with_name(MARK_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        raise RuntimeError(
            f"{path.parent} (data_dir/hub, where the deployment keeps the highest uid it gave) does not exist, so no "
            "account is made: start the hub with `spinnaker-jupyter up`, which makes it"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        uid = free_uid()
        if uid is not None:
            _write_mark(path, uid)
        return uid
    finally:
        os.close(fd)  # releases the lock


def _in_use(number: int) -> bool:
    """Whether an account or a group has this number (looked up by number, not by reading them all)."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(number)
            return True
        except KeyError:
            pass
    return False


class UidRangeFull(RuntimeError):
    """No uid of the deployment's range is left for a new account."""

    def __init__(self, account: str, hub_user: str, uid_range: tuple[int, int], mark: int | None = None) -> None:
        self.account, self.hub_user, self.uid_range, self.mark = account, hub_user, uid_range, mark
        super().__init__(self.message("server"))

    def message(self, what: str) -> str:
        """The operator's line, for the user's ``what`` ("server", "jobs")."""
        lo, hi = self.uid_range
        top = max(hi, self.mark or hi)
        return (
            f"No uid is left for {self.hub_user}'s new system account {self.account}: all {hi - lo + 1} uids of "
            f"spawner.local.uid_range [{lo}, {hi}] are taken or were given before (a uid is never given twice, even "
            f"a deleted account's{f'; the highest given is {self.mark}' if self.mark is not None else ''}), so "
            f"{self.hub_user}'s {what} cannot start. The operator raises the last uid of spawner.local.uid_range above "
            f"{top} in the config (`spinnaker-jupyter check` validates it) and restarts the hub."
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


def uid_range_check(
    uid_range: list[int] | tuple[int, int], data_dir: str | os.PathLike | None = None
) -> tuple[bool, str] | None:
    """What `spinnaker-jupyter check` says of the uids left for new accounts (above the high-water mark of the
    deployment with this ``data_dir``): (False, line) when none is left, (True, line) when few are (fewer than a
    tenth of the range, or than 100), else None."""
    lo, hi = uid_range
    try:
        mark = current_mark(uid_range, data_dir)
    except PermissionError:  # data_dir/hub is root's: without the mark, the accounts' highest uid
        mark = current_mark(uid_range, None)
    size, left = hi - lo + 1, uids_left(taken_ids(), uid_range, mark)
    if left >= max(size // 10, min(100, size)):
        return None
    given = f"; the highest uid ever given is {mark}" if mark >= lo else ""
    if left == 0:
        return (
            False,
            f"accounts: no uid is left in spawner.local.uid_range [{lo}, {hi}] (a uid is never given twice{given}): "
            f"new users' servers and jobs cannot start; raise the range's last uid above {max(hi, mark)} in the config "
            "and restart the hub",
        )
    return (
        True,
        f"accounts: only {left} of the {size} uids of spawner.local.uid_range [{lo}, {hi}] are left for new users "
        f"(a uid is never given twice{given}): make the range larger before it runs out",
    )


def uid_range_report(uid_range: list[int] | tuple[int, int], data_dir: str | os.PathLike | None = None) -> str | None:
    """:func:`uid_range_check`'s line, or None."""
    found = uid_range_check(uid_range, data_dir)
    return found[1] if found else None
