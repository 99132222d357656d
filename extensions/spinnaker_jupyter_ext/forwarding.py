"""What of the user's request may travel through a proxy route to what listens behind it: not their credentials.

The request reaching the user's server carries what proves who they are to it: the hub's login cookies
(jupyterhub-*), the server's own login cookie, the _xsrf cookie (and its X-XSRFToken header), an `Authorization`
header and a `token=` query parameter. A proxied application (the NRP, a user's web app) never needs them, and with
them whatever listens behind the route could act as the user. Everything else (the application's own cookies,
headers, query) passes unchanged.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from tornado.httputil import HTTPHeaders

DROPPED_HEADERS = ("authorization", "x-xsrftoken")  # compared in lower case
DROPPED_COOKIE_PREFIXES = ("jupyterhub-",)
DROPPED_COOKIES = ("_xsrf",)
DROPPED_QUERY = ("token", "_xsrf")


def keeps_cookie(name: str, login_cookie: str | None = None) -> bool:
    return not (name.startswith(DROPPED_COOKIE_PREFIXES) or name in DROPPED_COOKIES or name == login_cookie)


def scrub_cookie_header(value: str, login_cookie: str | None = None) -> str:
    """The Cookie header without the user's login and xsrf cookies (the others byte for byte)."""
    kept = [
        part.strip()
        for part in value.split(";")
        if part.strip() and keeps_cookie(part.split("=", 1)[0].strip(), login_cookie)
    ]
    return "; ".join(kept)


def scrub_query(query: str) -> str:
    """A query string without token= / _xsrf= (the other parameters byte for byte, in order)."""
    return "&".join(p for p in query.split("&") if p and unquote_plus(p.split("=", 1)[0]) not in DROPPED_QUERY)


def scrub_uri(uri: str) -> str:
    """An absolute or relative URI whose query is scrubbed."""
    base, sep, rest = uri.partition("?")
    if not sep:
        return uri
    query, hash_sep, fragment = rest.partition("#")
    query = scrub_query(query)
    return base + ("?" + query if query else "") + hash_sep + fragment


def scrub_headers(headers: HTTPHeaders, login_cookie: str | None = None) -> HTTPHeaders:
    """A copy of <headers> fit to forward: no credentials of the user (a Referer keeps its path, not its token)."""
    out = HTTPHeaders()
    for name, value in headers.get_all():
        if name.lower() in DROPPED_HEADERS:
            continue
        if name.lower() == "cookie":
            value = scrub_cookie_header(value, login_cookie)
            if not value:
                continue
        elif name.lower() == "referer":
            value = scrub_uri(value)
        out.add(name, value)
    return out
