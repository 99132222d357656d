"""Cookies that work inside a frame of another site (the hub embedded in an EBRAINS collab page).

A browser keeps and sends a framed site's cookies only when they are `SameSite=None; Secure`, and, where it blocks
third-party cookies (measured: Debian's Chromium 156 does by default), only when they are also `Partitioned` (CHIPS:
kept per embedding site). JupyterHub's `cookie_options` pass these on when cookies are set, but
- Python's http.cookies knows the Partitioned attribute only from 3.14 (a CookieError before), and
- JupyterHub 6.1.1 clears cookies (logout) with their path only: the deletion of a framed cookie is then refused by
  the browser, or lands in another partition, and the user stays logged in inside the frame.

So, in a process that serves framed pages (the hub, a user server), every cookie set or cleared carries the three
attributes. Private APIs, fenced here and checked against Python 3.11 (http.cookies.Morsel._reserved / _flags) and
Tornado 6.6 (RequestHandler.set_cookie passes unknown keywords on to the Morsel): tests/integration/test_embedding.py fails if
they change.
"""

from __future__ import annotations

import functools
import http.cookies
import json
import os
import warnings

FRAMED = {"samesite": "None", "secure": True, "partitioned": True}  # tornado set_cookie keywords


def wanted(cookie_options: dict | None = None) -> bool:
    """Framed cookies are asked for: `partitioned` in the options (the hub's config, or JupyterHub's
    JUPYTERHUB_COOKIE_OPTIONS in a user server, from Spawner.cookie_options)."""
    if cookie_options is None:
        try:
            cookie_options = json.loads(os.environ.get("JUPYTERHUB_COOKIE_OPTIONS") or "{}")
        except ValueError:
            return False
    return bool(isinstance(cookie_options, dict) and cookie_options.get("partitioned"))


def frame_cookies() -> None:
    """Make every cookie this process sets or clears SameSite=None; Secure; Partitioned. Idempotent."""
    from tornado.web import RequestHandler

    morsel = http.cookies.Morsel
    if "partitioned" not in morsel._reserved:  # Python < 3.14
        morsel._reserved["partitioned"] = "Partitioned"
        morsel._flags.add("partitioned")
    original = RequestHandler.set_cookie
    if getattr(original, "_framed", False):
        return

    @functools.wraps(original)
    def set_cookie(self, name, value, *args, **kwargs):
        kwargs.update(FRAMED)  # also on deletions: clear_cookie goes through set_cookie
        return original(self, name, value, *args, **kwargs)

    set_cookie._framed = True
    RequestHandler.set_cookie = set_cookie
    # Tornado warns about every keyword it does not name (partitioned): expected here, not news for the log.
    warnings.filterwarnings(
        "ignore", message=r"Deprecated arguments to set_cookie: \{'partitioned'\}", category=DeprecationWarning
    )
