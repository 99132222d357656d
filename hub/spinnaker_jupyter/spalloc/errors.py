"""The allocation service's errors, and how each is worded for the user or the operator who must act on it."""

from __future__ import annotations

import socket

from tornado.httpclient import HTTPClientError, HTTPResponse

#: Where operators set things; used in error messages so they say which setting to change.
SETTINGS = "spinnaker.spalloc"


class SpallocError(Exception):
    """Anything that went wrong talking to the allocation service; the message says what to do about it."""


class SpallocUnreachableError(SpallocError):
    """The service could not be reached (DNS, connection refused, timeouts, TLS trust)."""


class SpallocAuthError(SpallocError):
    """The service refused the credentials (no token, bad or expired token, forbidden)."""


class SpallocRequestError(SpallocError):
    """The service answered a request with an error status."""

    def __init__(self, message: str, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class SpallocProtocolError(SpallocError):
    """The server did not answer like a spalloc service (wrong URL?)."""


class SpallocJobDestroyedError(SpallocError):
    """The job was destroyed (by the service, an operator, a keepalive expiry, or a release)."""

    def __init__(self, message: str, job_url: str, reason: str | None) -> None:
        super().__init__(message)
        self.job_url = job_url
        self.reason = reason


class SpallocTimeoutError(SpallocError):
    """A claim did not get its boards in time."""


# The wording of failures: each says what went wrong and which setting or whom to turn to.
def describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.gaierror):
        return f"host name not found ({e.strerror or e})"
    if isinstance(e, HTTPClientError):
        return (e.message or "timed out").lower()
    return str(e) or type(e).__name__


def response_text(resp: HTTPResponse) -> str:
    try:
        text = (resp.body or b"").decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001
        text = ""
    return text[:300] or (resp.reason or "")


def auth_error(service_url: str, resp: HTTPResponse, what: str) -> SpallocAuthError:
    text = response_text(resp)
    if resp.code == 403:
        return SpallocAuthError(
            f"The SpiNNaker allocation service at {service_url} refused to let this account {what} "
            f"(HTTP 403: {text}). The account may lack the right role or group; ask the service's operators."
        )
    return SpallocAuthError(
        f"The SpiNNaker allocation service at {service_url} did not accept the access token when "
        f"trying to {what} (HTTP {resp.code}: {text}). Check `{SETTINGS}.token`: it may be wrong or expired."
    )


def status_error(resp: HTTPResponse, what: str) -> SpallocRequestError:
    text = response_text(resp)
    if resp.code == 400:
        msg = f"The SpiNNaker allocation service refused to {what}: {text} (HTTP 400)."
    elif resp.code == 404:
        msg = f"The SpiNNaker allocation service could not {what}: not found (HTTP 404: {text})."
    elif resp.code >= 500:
        msg = (
            f"The SpiNNaker allocation service failed to {what} (HTTP {resp.code}: {text}); it may be "
            f"overloaded or broken. Try again later."
        )
    else:
        msg = f"The SpiNNaker allocation service answered HTTP {resp.code} when asked to {what}: {text}."
    return SpallocRequestError(msg, resp.code, text)


def protocol_error(resp: HTTPResponse, url: str, detail: str = "") -> SpallocProtocolError:
    detail = detail or f"HTTP {resp.code}: {response_text(resp)[:120]}"
    return SpallocProtocolError(
        f"{url} did not answer like a SpiNNaker allocation service ({detail}). `{SETTINGS}.url` should be "
        f"the service's root, e.g. https://spinnaker.cs.man.ac.uk/spalloc/."
    )
