"""Turn an identity provider's user name (EBRAINS ``preferred_username``) into a safe hub user name.

The hub user name ends up in URL paths (``/user/<name>/``), in file system paths (home folders),
in container and volume names and possibly in a system account name. So it must be short, plain
ASCII, and unable to traverse or inject anything. And two different people must never end up with
the same hub user (and so the same home folder and servers).

Rules (pure functions, no state, no registry):

* A name that is already *canonical* is kept unchanged. Canonical means: only ``[a-z0-9._-]``,
  starts and ends with a letter or digit, never two ``-`` in a row, at most ``max_length``
  (default 32) characters.
* Any other name is changed: NFKC, case-folded, accents dropped, every run of other characters
  replaced by one ``-``, trimmed to letters/digits at both ends, shortened, and then suffixed with
  ``--`` and a hash of the *original* name (``HASH_LENGTH`` base32 characters, 50 bits).
  A name with nothing left (for example ``"..."``) becomes ``u--<hash>``.

Why this never maps two different source names to one result: an unchanged name never contains
``--``, a changed one always does; two unchanged names are their own (different) selves; two changed
names differ in their hash unless SHA-256 collides in 50 bits (about 1 in 10**15 for a pair).
Every result passes :func:`is_safe_username`. A changed result is not canonical (it holds ``--``),
so it is not a fixed point: feed only identity-provider names in, never hub names.

Examples: ``alice`` -> ``alice``; ``Alice`` -> ``alice--<hash>``; ``a b`` -> ``a-b--<hash>``;
``../etc`` -> ``etc--<hash>``; ``ünïcode`` -> ``unicode--<hash>``; ``""`` -> ``ValueError``.

This module is also the one place for the other user-name rules, so that they can be read side by side:

* local accounts (``auth.type: local``): :func:`local_name_problem`, a stricter shape that is its own system
  account name with the default prefix;
* the deployment config's user names (``hub.admin_users``, ``auth.local.admin``): :data:`CONFIG_NAME_PATTERN`;
* the system account a hub user's server and jobs run as: :func:`system_account_name`, and whether an existing
  account of that name is this deployment's (:func:`own_system_account`: another deployment's is refused);
* the uid a new account gets: :func:`next_uid`, from the deployment's own ``spawner.local.uid_range``
  (:func:`uid_range_problem` says whether a range suits this machine).
"""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import re
import subprocess
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Default upper bound of a hub user name (Linux `useradd` also stops at 32).
MAX_LENGTH = 32
#: Length of the hash suffix (base32 characters, 5 bits each).
HASH_LENGTH = 10
#: Separator between the readable part and the hash; never found in an unchanged name.
SEPARATOR = "--"
#: Readable part used when nothing readable is left of a name.
FALLBACK_BASE = "u"
#: The shortest max_length that still leaves room for a readable part.
MIN_MAX_LENGTH = len(FALLBACK_BASE) + len(SEPARATOR) + HASH_LENGTH + 3

_CANONICAL = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_NOT_ALLOWED = re.compile(r"[^a-z0-9._-]+")
_DASHES = re.compile(r"-{2,}")
_EDGE = re.compile(r"^[._-]+|[._-]+$")


def _check_max_length(max_length: int) -> None:
    if max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_MAX_LENGTH}, got {max_length}")


def is_safe_username(name: str, max_length: int = MAX_LENGTH) -> bool:
    """True if ``name`` has the shape of a hub user name this module produces.

    (Plain ASCII ``[a-z0-9._-]``, starts and ends with a letter or digit, at most ``max_length``.)
    Both unchanged and changed names pass; this is the check to apply to a name before using it
    in a path or a container name.
    """
    return isinstance(name, str) and 0 < len(name) <= max_length and _CANONICAL.fullmatch(name) is not None


def is_canonical(name: str, max_length: int = MAX_LENGTH) -> bool:
    """True if ``name`` is kept unchanged by :func:`normalize_username`."""
    return is_safe_username(name, max_length) and SEPARATOR not in name


def name_hash(name: str, length: int = HASH_LENGTH) -> str:
    """A short, stable hash of the original name: lower-case base32 of SHA-256 of its UTF-8 bytes.

    Lone surrogates (possible in names decoded from JSON) are kept with ``surrogatepass``, so every
    distinct ``str`` hashes distinct bytes.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:length]


def _readable(name: str) -> str:
    """The readable ASCII part of a name (may be empty)."""
    text = unicodedata.normalize("NFKC", name).casefold()
    # drop accents: decompose, then remove combining marks (ü -> u, ï -> i)
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = _NOT_ALLOWED.sub("-", text)
    text = _DASHES.sub("-", text)
    return _EDGE.sub("", text)


def normalize_username(name: str, max_length: int = MAX_LENGTH) -> str:
    """Map an identity-provider user name to a safe, collision-free hub user name.

    :raises TypeError: if ``name`` is not a string.
    :raises ValueError: if ``name`` is empty (an identity without a user name is refused rather
        than given an invented one), or ``max_length`` is too small.
    """
    if not isinstance(name, str):
        raise TypeError(f"user name must be a str, not {type(name).__name__}")
    if name == "":
        raise ValueError("empty user name")
    _check_max_length(max_length)
    if is_canonical(name, max_length):
        return name
    suffix = SEPARATOR + name_hash(name)
    base = _readable(name)[: max_length - len(suffix)]
    base = _EDGE.sub("", base) or FALLBACK_BASE
    result = base + suffix
    assert is_safe_username(result, max_length) and not is_canonical(result, max_length)
    return result


def username_from_claims(
    user_info: Mapping[str, Any],
    claim: str = "preferred_username",
    max_length: int = MAX_LENGTH,
) -> str:
    """The hub user name for an OIDC userinfo response (EBRAINS: ``preferred_username``).

    Suitable for ``c.GenericOAuthenticator.username_claim`` (which may be a callable taking the
    userinfo dict). Raises ``ValueError`` when the claim is missing or empty, so that a login without
    a user name fails instead of creating a user.
    """
    value = user_info.get(claim)
    if not isinstance(value, str) or not value:
        raise ValueError(f"userinfo has no usable {claim!r} claim")
    return normalize_username(value, max_length)


# ------------------------------------------------------------------------------------- names in the deployment config
#: JSON-Schema pattern of a user name in the deployment config (hub.admin_users, auth.local.admin). Wider than both
#: rules above and below (a hub user an admin made through the REST API may have a longer name); ``(?!\n)``: Python's
#: ``$`` also matches before a final newline, and ``alice\n`` is not ``alice``.
CONFIG_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$(?!\n)"


# ------------------------------------------------------------------------------------------------------ local accounts
#: A local account's name (auth.type local): 1-24 of ``[a-z0-9_-]`` starting with a letter, so that with the default
#: prefix ``jupyter-`` it is its own system account name (32 characters at most, nothing replaced).
LOCAL_NAME = re.compile(r"[a-z][a-z0-9_-]{0,23}")


def local_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a local account's name (one line for the operator), or None."""
    if isinstance(name, str) and LOCAL_NAME.fullmatch(name):
        return None
    return (
        f"{name!r} is not a valid account name: use 1-24 lower-case letters, digits, '-' or '_', starting with a letter"
    )


# ----------------------------------------------------------------------------------------------------- system accounts
#: Longest Linux account name (useradd).
SYSTEM_NAME_MAX = 32
#: The comment (GECOS) a deployment gives the system accounts it makes: how one made by another deployment is told
#: from one some other software made.
ACCOUNT_COMMENT = "Jupyter user {}"


def system_account_name(prefix: str, name: str) -> str:
    """A valid, stable, collision-free Linux account name (at most 32 characters of [a-z0-9_-]) for a hub user."""
    wanted = prefix + name
    safe = re.sub(r"[^a-z0-9_-]", "_", wanted.lower())
    if safe == wanted and len(safe) <= SYSTEM_NAME_MAX:
        return safe
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{safe[:25]}-{digest}"


def make_system_account(
    account: str, home: Path, hub_user: str, uid_range: tuple[int, int] | list[int] | None = None
) -> pwd.struct_passwd:
    """Create ``account`` (a system account with its own group, no home created: the caller makes it private).

    Its uid is the lowest one of ``uid_range`` (default :data:`DEFAULT_UID_RANGE`) that no account or group has
    (:func:`next_uid`); its group gets the same number as gid (free by that choice; another of the range should a
    group have taken it meanwhile). :class:`UidRangeFull` when none is left."""
    lo, hi = uid_range or DEFAULT_UID_RANGE
    # useradd's --system ranges pointed at the deployment's: no warning for a uid above SYS_UID_MAX, and the group's
    # gid comes from that range too (--user-group otherwise falls back to the OS's system gids, 100-999)
    ranges = [f"{key}_{value}" for key in ("SYS_UID", "SYS_GID") for value in (f"MIN={lo}", f"MAX={hi}")]
    made = None
    for _attempt in range(5):
        uid = next_uid(taken_ids(), (lo, hi))
        if uid is None:
            raise UidRangeFull(account, hub_user, (lo, hi))
        made = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--uid",
                str(uid),
                *(arg for r in ranges for arg in ("-K", r)),
                "--no-create-home",
                "--shell",
                "/bin/bash",
                "--home-dir",
                str(home),
                "--comment",
                ACCOUNT_COMMENT.format(hub_user),
                account,
            ],
            capture_output=True,
            text=True,
        )
        if made.returncode == _USERADD_UID_IN_USE:  # another process (the job service, a hub) took it meanwhile
            continue
        if made.returncode == _USERADD_NAME_IN_USE:  # made meanwhile for this user's server or jobs: the caller's
            break  # own_system_account says whether it is this deployment's
        if made.returncode != 0:
            raise RuntimeError(f"Could not create the system account {account} for {hub_user}: {made.stderr.strip()}")
        break
    try:
        return pwd.getpwnam(account)
    except KeyError:
        raise RuntimeError(
            f"Could not create the system account {account} for {hub_user}: {made.stderr.strip()}"
        ) from None


class AccountOfAnotherDeployment(RuntimeError):
    """The system account exists with another deployment's home: its user is another person."""

    def __init__(self, account: str, found_home: str, home: Path, hub_user: str) -> None:
        self.account, self.found_home, self.home, self.hub_user = account, found_home, home, hub_user
        super().__init__(self.message("server"))

    def message(self, what: str) -> str:
        """The operator's line, for the user's ``what`` ("server", "jobs")."""
        return (
            f"The system account {self.account} belongs to another deployment on this machine (its home is "
            f"{self.found_home}, not {self.home}), so {self.hub_user}'s {what} will not run as it. The operator "
            "gives this deployment its own spawner.local.system_user_prefix (e.g. 'jupyter2-'), or, if this "
            f"deployment was moved from {self.found_home}, runs `usermod --home {self.home} {self.account}`."
        )


def own_system_account(pw: pwd.struct_passwd, home: Path, hub_user: str, log=None) -> pwd.struct_passwd:
    """The existing system account ``pw``, if it is this deployment's: its home is this deployment's home for the user.

    Another deployment's account is refused (:class:`AccountOfAnotherDeployment`: its user would become ours), unless
    that deployment is gone (the account was made by a deployment, its home no longer exists and nothing runs as
    it): then it is taken over. An account some other software made is never taken over. The servers' and the batch
    jobs' accounts go through this one rule.
    """
    if os.path.realpath(pw.pw_dir) == os.path.realpath(home):
        return pw
    made_by_a_deployment = pw.pw_gecos == ACCOUNT_COMMENT.format(hub_user)
    if made_by_a_deployment and not os.path.exists(pw.pw_dir) and not _runs_as(pw.pw_uid):
        moved = subprocess.run(["usermod", "--home", str(home), pw.pw_name], capture_output=True, text=True)
        if moved.returncode == 0:
            if log is not None:
                log.warning(
                    "Took over the system account %s left by a removed deployment (home was %s)", pw.pw_name, pw.pw_dir
                )
            return pwd.getpwnam(pw.pw_name)
    raise AccountOfAnotherDeployment(pw.pw_name, pw.pw_dir, home, hub_user)


def _runs_as(uid: int) -> bool:
    """Whether any process runs as ``uid``."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    return True
            except FileNotFoundError:
                pass
    return False


# ------------------------------------------------------------------------------------------- the accounts' uids
#: useradd's exit codes: the uid asked for is taken; the account name is taken.
_USERADD_UID_IN_USE, _USERADD_NAME_IN_USE = 4, 9
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
