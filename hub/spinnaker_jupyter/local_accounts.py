"""Local accounts for the embedded default: no outside service, no well-known password.

Accounts live in one JSON file (0600) beside the hub database, with salted PBKDF2 hashes. Operators manage them
with `spinnaker-jupyter user ...`; the first start creates the admin with a generated password printed once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from jupyterhub.auth import Authenticator
from traitlets import Unicode, default

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,23}$")  # fits a system account with the default prefix
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


def generate_password() -> str:
    return secrets.token_urlsafe(12)


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

    def _save(self, accounts: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(accounts, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file

    def names(self) -> dict[str, bool]:
        return {name: a.get("admin", False) for name, a in sorted(self._load().items())}

    def add(self, name: str, admin: bool = False, password: str | None = None) -> str:
        if not NAME_RE.match(name):
            raise AccountError(f"'{name}' is not a valid account name: use 1-24 lower-case letters, digits, '-' or "
                               "'_', starting with a letter")
        accounts = self._load()
        if name in accounts:
            raise AccountError(f"account '{name}' already exists (use `user passwd {name}` to reset its password)")
        password = password or generate_password()
        accounts[name] = {"hash": _hash(password, secrets.token_bytes(16)), "admin": admin}
        self._save(accounts)
        return password

    def set_password(self, name: str, password: str | None = None, min_length: int = 10) -> str:
        accounts = self._load()
        if name not in accounts:
            raise AccountError(f"no account '{name}' (see `user list`)")
        if password is not None and len(password) < min_length:
            raise AccountError(f"password too short: at least {min_length} characters")
        password = password or generate_password()
        accounts[name]["hash"] = _hash(password, secrets.token_bytes(16))
        self._save(accounts)
        return password

    def remove(self, name: str) -> None:
        accounts = self._load()
        if accounts.pop(name, None) is None:
            raise AccountError(f"no account '{name}' (see `user list`)")
        self._save(accounts)

    def check(self, name: str, password: str) -> dict | None:
        account = self._load().get(name)
        if account and _verify(password, account["hash"]):
            return account
        return None


class LocalAccountsAuthenticator(Authenticator):
    """Log in with an account from the deployment's account file."""

    accounts_file = Unicode(help="JSON file of local accounts (managed with `spinnaker-jupyter user`).").tag(
        config=True)

    @default("any_allow_config")
    def _any_allow_config_default(self):
        return True  # the account file is the allow list

    def _store(self) -> AccountStore:
        return AccountStore(Path(self.accounts_file))

    async def authenticate(self, handler, data):
        name = self.normalize_username(data.get("username", ""))
        account = await _in_thread(self._store().check, name, data.get("password", ""))
        if account is None:
            self.log.warning("Failed login for %r", name)
            return None
        return {"name": name, "admin": bool(account.get("admin"))}

    def check_allowed(self, username, authentication=None):
        # Only accounts in the file can log in at all; admins may still add hub users for groups/sharing.
        return username in self._store().names() or super().check_allowed(username, authentication)


async def _in_thread(fn, *args):
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
