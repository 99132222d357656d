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
* the uid a new account gets: ``uid_range.give_uid``, from the deployment's own ``spawner.local.uid_range``, above the
  highest uid it ever gave (``uid_range.py``, which also says whether a range suits this machine).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import subprocess
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .uid_range import DEFAULT_UID_RANGE, UidRangeFull, current_mark, give_uid

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


#: useradd's exit codes: the uid asked for is taken; the account name is taken.
_USERADD_UID_IN_USE, _USERADD_NAME_IN_USE = 4, 9


def make_system_account(
    account: str,
    home: Path,
    hub_user: str,
    uid_range: tuple[int, int] | list[int] | None = None,
    data_dir: Path | None = None,
) -> pwd.struct_passwd:
    """Create ``account`` (a system account with its own group, no home created: the caller makes it private).

    Its uid is the lowest one of ``uid_range`` (default :data:`DEFAULT_UID_RANGE`) above the highest this deployment
    ever gave that no account or group has (:func:`give_uid`, the mark kept in ``data_dir``, by default the one of
    ``home``: homes are data_dir/homes/<user>); its group gets the same number as gid (free by that choice; another of
    the range should a group have taken it meanwhile). :class:`UidRangeFull` when none is left."""
    lo, hi = uid_range or DEFAULT_UID_RANGE
    data_dir = Path(home).parent.parent if data_dir is None else data_dir
    # useradd's --system ranges pointed at the deployment's: no warning for a uid above SYS_UID_MAX, and the group's
    # gid comes from that range too (--user-group otherwise falls back to the OS's system gids, 100-999)
    ranges = [f"{key}_{value}" for key in ("SYS_UID", "SYS_GID") for value in (f"MIN={lo}", f"MAX={hi}")]
    made = None
    for _attempt in range(5):
        uid = give_uid(data_dir, (lo, hi))
        if uid is None:
            mark = current_mark((lo, hi), data_dir)
            raise UidRangeFull(account, hub_user, (lo, hi), mark if mark >= lo else None)
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

    The mark is the home path in the account's passwd entry (written by root, at useradd): ``<homes_dir>/<user>``
    names the deployment whether the folder exists (local servers) or never does (container servers: their home is
    a volume), and `user remove` needs no folder for it (there an existing home means a removal cut short). Another
    deployment's account is refused (:class:`AccountOfAnotherDeployment`: its user would become ours), unless that
    deployment is gone: the account was made by a deployment (its comment), the folder its home is in (that
    deployment's homes_dir, which `up` makes in every mode) no longer exists, and nothing runs as it; then it is
    taken over. Not the home itself: a container deployment's never exists, so two on one machine with one prefix
    would take each other's accounts. An account some other software made is never taken over. Local and container
    servers and the batch jobs go through this one rule.
    """
    if os.path.realpath(pw.pw_dir) == os.path.realpath(home):
        return pw
    made_by_a_deployment = pw.pw_gecos == ACCOUNT_COMMENT.format(hub_user)
    if made_by_a_deployment and _deployment_gone(pw.pw_dir) and not _runs_as(pw.pw_uid):
        moved = subprocess.run(["usermod", "--home", str(home), pw.pw_name], capture_output=True, text=True)
        if moved.returncode == 0:
            if log is not None:
                log.warning(
                    "Took over the system account %s left by a removed deployment (home was %s)", pw.pw_name, pw.pw_dir
                )
            return pwd.getpwnam(pw.pw_name)
    raise AccountOfAnotherDeployment(pw.pw_name, pw.pw_dir, home, hub_user)


def _deployment_gone(account_home: str) -> bool:
    """Whether the deployment that gave an account ``account_home`` is gone: its homes_dir (the folder the home is in)
    no longer exists. A link there, even a dangling one (storage not mounted), counts as there."""
    if not os.path.isabs(account_home):
        return False
    return not os.path.lexists(os.path.dirname(os.path.normpath(account_home)))


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
