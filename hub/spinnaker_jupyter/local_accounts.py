"""Local accounts for the embedded default: no outside service, no well-known password.

Accounts live in one JSON file (0600) beside the hub database, with salted PBKDF2 hashes. Operators manage them
with `spinnaker-jupyter user ...`; the first start creates the admin with a generated password printed once.
Every change takes an exclusive lock on a lock file beside it and replaces the file through a temporary file of its
own, so concurrent `user add` / `user remove` never lose each other's work; the hub only reads it.
Logins cost the same whether the name exists or not, and failures back off (LoginThrottle) without letting
strangers lock a user out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from jupyterhub.auth import Authenticator
from tornado import web
from traitlets import Unicode, default

from .usernames import local_name_problem
from .words import duration

ITERATIONS = 600_000


def _hash(password: str, salt: bytes, iterations: int = ITERATIONS) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def _verify(password: str, stored: str) -> bool:
    try:
        _, iterations, salt, _ = stored.split("$")
        return hmac.compare_digest(_hash(password, bytes.fromhex(salt), int(iterations)), stored)
    except ValueError:
        return False


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so that an unknown name costs as long as a wrong password."""
    return _hash(secrets.token_urlsafe(16), secrets.token_bytes(16))


def generate_password() -> str:
    return secrets.token_urlsafe(12)


def password_problem(name: str, password: str, min_length: int = 10) -> str | None:
    """Why `password` must not be used, or None. The common-password list is zxcvbn's (PyPI `zxcvbn`, MIT): the
    30,000 most frequent passwords of a leaked-password corpus; zxcvbn's estimate also catches their variants."""
    if len(password) < min_length:
        return f"password too short: at least {min_length} characters"
    if name and name.lower() in password.lower():
        return "the password contains the account name: choose one that does not"
    from zxcvbn import zxcvbn
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    if password.lower() in FREQUENCY_LISTS["passwords"]:
        return "that password is on the list of the 30,000 most common passwords: choose another"
    verdict = zxcvbn(password[:100], user_inputs=[name])
    if verdict["score"] < 3:
        hint = verdict["feedback"].get("warning") or "it is easy to guess"
        return (
            f"that password is too easy to guess ({hint.rstrip('.')}): use four or more uncommon words or a "
            "generated password (leave the password out to get one)"
        )
    return None


class AccountError(Exception):
    pass


class AccountStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    @contextlib.contextmanager
    def _locked(self):
        """The accounts for a read-modify-write: exclusive against every other writer until the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._load()
        finally:
            os.close(fd)  # releases the lock

    def _save(self, accounts: dict) -> None:
        # A temporary name of its own per writer, in the same folder: the rename is atomic, a crash leaves no half
        # file and two writers never write into one temporary file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(accounts, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def names(self) -> dict[str, bool]:
        return {name: a.get("admin", False) for name, a in sorted(self._load().items())}

    def add(self, name: str, admin: bool = False, password: str | None = None, min_length: int = 10) -> str:
        if problem := local_name_problem(name):  # the rule for local account names: usernames.py
            raise AccountError(problem)
        if password is not None and (problem := password_problem(name, password, min_length)):
            raise AccountError(problem)
        with self._locked() as accounts:
            if name in accounts:
                raise AccountError(f"account '{name}' already exists (use `user passwd {name}` to reset its password)")
            password = password or generate_password()
            accounts[name] = {"hash": _hash(password, secrets.token_bytes(16)), "admin": admin}
            self._save(accounts)
        return password

    def set_password(self, name: str, password: str | None = None, min_length: int = 10) -> str:
        if name not in self._load():
            raise AccountError(f"no account '{name}' (see `user list`)")
        if password is not None and (problem := password_problem(name, password, min_length)):
            raise AccountError(problem)
        password = password or generate_password()
        new_hash = _hash(password, secrets.token_bytes(16))
        with self._locked() as accounts:
            if name not in accounts:
                raise AccountError(f"no account '{name}' (see `user list`)")
            accounts[name]["hash"] = new_hash
            self._save(accounts)
        return password

    def remove(self, name: str) -> None:
        with self._locked() as accounts:
            if accounts.pop(name, None) is None:
                raise AccountError(f"no account '{name}' (see `user list`)")
            self._save(accounts)

    def check(self, name: str, password: str) -> dict | None:
        """The account if `password` is right; the same work (one PBKDF2) whether or not `name` exists."""
        account = self._load().get(name)
        ok = _verify(password, account["hash"] if account else _dummy_hash())
        return account if ok and account else None


class LoginThrottle:
    """Back-off after failed logins that strangers cannot turn against a user. Three counts, each letting `free`
    failures pass, then making the next attempt wait 2, 4, 8 ... (at most `cap`) seconds after its last counted
    failure; a waiting attempt is answered at once without checking the password (guessing costs the hub nothing)
    and is not counted:

    - per (name, address), 5: one account guessed from one place. Failing with someone's name from elsewhere does
      not slow that person down where they are.
    - per address, 20: one place trying many names.
    - per name, over all addresses, 30: one account guessed from many places. It never applies to an address the
      name has logged in from (remembered while the hub runs), so nobody can lock a user out of where they log in;
      a user on a new address while their name is under such a guess waits as the guessers do (at most `cap`).

    A success clears its (name, address) count and remembers the address for the name."""

    def __init__(
        self,
        free_per_pair: int = 5,
        free_per_address: int = 20,
        free_per_name: int = 30,
        cap: float = 300.0,
        max_entries: int = 100_000,
    ):
        self.free = {"pair": free_per_pair, "address": free_per_address, "name": free_per_name}
        self.cap, self.max_entries = cap, max_entries
        self._fails: dict[tuple, tuple[int, float]] = {}
        self._known: dict[str, dict[str, float]] = {}  # name -> addresses it logged in from -> when
        self._lock = threading.Lock()

    def _keys(self, name: str, address: str) -> list[tuple]:
        return [("pair", name, address), ("address", address), ("name", name)]

    def _wait(self, key: tuple, now: float) -> float:
        count, last = self._fails.get(key, (0, 0.0))
        over = count - self.free[key[0]]
        if over < 0:
            return 0.0
        return max(0.0, last + min(self.cap, 2.0 ** (over + 1)) - now)

    def retry_after(self, name: str, address: str) -> float:
        now = time.monotonic()
        with self._lock:
            known = address in self._known.get(name, ())
            return max(self._wait(key, now) for key in self._keys(name, address) if not (known and key[0] == "name"))

    def _forget_oldest(self, table: dict, when) -> None:
        if len(table) >= self.max_entries:  # forget the oldest half rather than grow without bound
            for key, _ in sorted(table.items(), key=lambda kv: when(kv[1]))[: self.max_entries // 2]:
                del table[key]

    def failed(self, name: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._forget_oldest(self._fails, lambda v: v[1])
            for key in self._keys(name, address):
                self._fails[key] = (self._fails.get(key, (0, 0.0))[0] + 1, now)

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._fails.pop(("pair", name, address), None)
            self._forget_oldest(self._known, lambda v: max(v.values(), default=0.0))
            addresses = self._known.setdefault(name, {})
            addresses[address] = time.monotonic()
            if len(addresses) > 100:  # a name's oldest places are forgotten first
                del addresses[min(addresses, key=addresses.get)]


def client_address(handler) -> str:
    """The address that connected to the public proxy: the last X-Forwarded-For entry (configurable-http-proxy
    appends it), not an X-Real-Ip a client may set itself. Loopback entries at the end are a reverse proxy on this
    machine (nginx in front of the public proxy): the entry it appended before them is the client's."""
    entries = [e.strip() for e in handler.request.headers.get("X-Forwarded-For", "").split(",") if e.strip()]
    for entry in reversed(entries):
        with contextlib.suppress(ValueError):
            if not ipaddress.ip_address(entry).is_loopback:
                return entry
    return (entries[-1] if entries else handler.request.remote_ip) or "?"


class LocalAccountsAuthenticator(Authenticator):
    """Log in with an account from the deployment's account file."""

    accounts_file = Unicode(help="JSON file of local accounts (managed with `spinnaker-jupyter user`).").tag(
        config=True
    )

    @default("any_allow_config")
    def _any_allow_config_default(self):
        return True  # the account file is the allow list

    def _store(self) -> AccountStore:
        return AccountStore(Path(self.accounts_file))

    @property
    def throttle(self) -> LoginThrottle:
        if not hasattr(self, "_throttle"):
            self._throttle = LoginThrottle()
        return self._throttle

    async def authenticate(self, handler, data):
        name = self.normalize_username(data.get("username", ""))
        address = client_address(handler)
        wait = self.throttle.retry_after(name, address)
        if wait > 0:
            self.log.warning(
                "Login for %r from %s refused: back-off after failed logins (%.0f s left)", name, address, wait
            )
            raise web.HTTPError(
                429,
                f"Too many failed logins for this name from your address: try again in "
                f"{duration(max(1, math.ceil(wait)))}.",
            )
        account = await _in_thread(self._store().check, name, data.get("password", ""))
        if account is None:
            self.throttle.failed(name, address)
            self.log.warning("Failed login for %r from %s", name, address)
            return None
        self.throttle.succeeded(name, address)
        return {"name": name, "admin": bool(account.get("admin"))}

    def check_allowed(self, username, authentication=None):
        # Only accounts in the file can log in at all; admins may still add hub users for groups/sharing.
        return username in self._store().names() or super().check_allowed(username, authentication)


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
