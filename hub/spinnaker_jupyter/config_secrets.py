"""Secrets and the deployment config: the secret files an operator gives (`*_file` keys: readable, private, not
empty) and the ones the hub writes (whole or not at all), the refusal of secrets written into the config file
itself (by key name, inside URLs, in the sPyNNaker cfg; messages never repeat the value), and the config with
every secret masked, which is what may be printed."""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .config_error import ConfigError

MIN_SECRET_CHARS = 32  # the generated ones have 64 (32 random bytes, hex)


def check_length(value: str, where: str, fix: str) -> str:
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"{where}: holds {len(value)} characters, too few for a secret (at least "
            f"{MIN_SECRET_CHARS}; an interrupted write leaves an empty file). Fix: {fix}."
        )
    return value


def read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(f"{key}: {path} is a folder; point it at the file holding the secret") from None
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file {path}") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text; write the secret into it as plain text") from None


def read_secret_file(path: Path, key: str, env: str) -> str:
    """An operator's secret file (`*_file` keys): readable, not open to others, not empty."""
    try:
        text = read_text(path, key).strip()
    except ConfigError as e:
        raise ConfigError(f"{e}. Fix the path, or give the secret in the environment variable {env}.") from None
    from .preflight import trusted

    try:
        trusted(path, key + ":", private=False)
    except ConfigError as e:
        raise ConfigError(f"{e} It holds a secret.") from None
    if stat.S_IMODE(path.stat().st_mode) & 0o007:
        raise ConfigError(
            f"{key}: {path} holds a secret and other accounts can read it. `chmod 600 {path}` (or "
            f"640 for a group of the hub's)"
        )
    if not text:
        raise ConfigError(f"{key}: {path} is empty; write the secret into it, or use the environment variable {env}")
    return text


def write_secret(path: Path, text: str) -> None:
    """Write a secret so that a failure (a full disk) never leaves an empty or partial file behind: into a private
    temporary file first, then linked into place, which also fails if a concurrent start got there first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # a concurrent start wrote it: use theirs
    except OSError as e:
        raise ConfigError(
            f"cannot write the secret {path}: {e.strerror}. Free space or fix permissions in "
            f"{path.parent}, then start again"
        ) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


SECRET_KEYS = {"client_secret", "password", "api_token", "crypt_key", "auth_token", "cookie_secret", "token"}
SECRET_LIKE = re.compile(r"pass(word|wd)?|secret|token|credential|api_?key|private_?key", re.I)
WHERE_SECRETS_GO = {
    "hub.db_url": "put the whole URL in the environment variable SPINNAKER_JUPYTER_DB_URL instead",
    "spinnaker.spalloc.url": "give the URL without them; the hub's token goes in the environment variable "
    "SPALLOC_TOKEN or spinnaker.spalloc.token_file (per-run: each user's own EBRAINS token "
    "reaches sPyNNaker through the access-token-service)",
    "spinnaker.extra_cfg": "the generated sPyNNaker cfg is readable by every user. The hub's spalloc token goes in "
    "the environment variable SPALLOC_TOKEN or spinnaker.spalloc.token_file; a user's own "
    "credentials go in their ~/.spynnaker.cfg",
}


def _url_credentials(value: str) -> str | None:
    """What in a URL is a credential (a password, or a secret-like query parameter), in words; None if nothing."""
    if "://" not in value:
        return None
    try:
        u = urlsplit(value.strip())
        if u.password:
            return "a password (user:password@)"
        for name, _ in parse_qsl(u.query):
            if SECRET_LIKE.search(name):
                return f"a secret in its query ({name}=)"
    except ValueError:
        return None
    return None


def _refuse(path: str, what: str) -> None:
    fix = next(
        (fix for key, fix in WHERE_SECRETS_GO.items() if path == key or path.startswith(key + ".")),
        "use the environment, or a `*_file` setting where one exists",
    )
    raise ConfigError(f"{path}: holds {what}; secrets do not belong in the config file: {fix}.")


def reject_inline_secrets(values, path=""):
    """Secrets by key name anywhere, credentials inside URLs anywhere, secret-like keys in the sPyNNaker cfg.
    Messages never repeat the value."""
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else []
    for key, value in items:
        full = f"{path}.{key}" if path else str(key)
        if key in SECRET_KEYS:
            raise ConfigError(
                f"{full}: secrets do not belong in the config file. Use the environment or a "
                f"`{key}_file` setting where one exists."
            )
        if path.startswith("spinnaker.extra_cfg.") and isinstance(key, str) and SECRET_LIKE.search(key):
            _refuse(full, "what looks like a secret")
        if isinstance(value, str) and (what := _url_credentials(value)):
            _refuse(full, f"a URL with {what}")
        reject_inline_secrets(value, full)


def redacted(values):
    """`values` with every URL password and secret-like value masked: what may be printed."""
    if isinstance(values, dict):
        return {k: "****" if isinstance(k, str) and k in SECRET_KEYS and v else redacted(v) for k, v in values.items()}
    if isinstance(values, list):
        return [redacted(v) for v in values]
    if isinstance(values, str) and _url_credentials(values):
        u = urlsplit(values)
        netloc = u.netloc.rsplit("@", 1)[-1]
        return urlunsplit(
            (u.scheme, f"****@{netloc}" if "@" in u.netloc else netloc, u.path, "****" if u.query else "", u.fragment)
        )
    return values
