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
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Mapping
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
    return (
        isinstance(name, str)
        and 0 < len(name) <= max_length
        and _CANONICAL.fullmatch(name) is not None
    )


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
    text = "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)
    )
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
