"""A real OpenID Connect provider for tests (tests/oidc/provider.mjs, npm ``oidc-provider``).

Use the session fixture ``oidc_provider`` (conftest.py loads this module as a plugin; do not also
import the fixture into a test module, that would start a second provider), or
:func:`start_oidc_provider` as a context manager.

The provider runs on 127.0.0.1 on a free port, with one confidential client (client_secret_post,
authorization_code + refresh_token, PKCE required as oauthenticator sends it) and EBRAINS-like
claims. Its redirect URIs are added at run time with :meth:`OIDCProvider.add_redirect_uri` (the
hub's port is only known later). See tests/oidc/provider.mjs for the claims and admin endpoints.

:func:`login_with_requests` drives a browser-like login through the provider's login and consent
forms with a ``requests.Session``; :func:`ebrains_auth` is a hub's ``auth`` section for this provider, and
:func:`hub_with_ebrains` starts a hub that logs in there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from ports import free_port

OIDC_DIR = Path(__file__).resolve().parent / "oidc"

#: Access-token lifetime used by the session fixture (seconds; tests that wait for expiry rely on it).
DEFAULT_ACCESS_TOKEN_TTL = 8


class LoginError(AssertionError):
    """The provider refused the login, or the flow did not end where expected."""


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Call ``condition`` until it returns something truthy; return that. Raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except (requests.RequestException, OSError) as err:
            value, last_error = None, err
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{detail}{extra}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------------
# npm dependencies


def ensure_npm_deps(directory: Path = OIDC_DIR, timeout: float = 300) -> None:
    """Install tests/oidc's node modules (``npm ci`` from the lock file) unless already there."""
    marker = directory / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed for the test OpenID Connect provider (tests/oidc) but is not on PATH")
    command = "ci" if (directory / "package-lock.json").exists() else "install"
    result = subprocess.run(
        [npm, command, "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0 or not marker.exists():
        pytest.fail(f"npm {command} in {directory} failed:\n{result.stdout}\n{result.stderr}")


# ------------------------------------------------------------------------------------------------
# HTML forms


@dataclass
class Form:
    action: str
    method: str
    attrs: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)
    input_types: dict[str, str] = field(default_factory=dict)
    submit: tuple[str, str] | None = None  # first named submit button (as a browser sends it)

    @property
    def is_login(self) -> bool:
        return "password" in self.input_types.values()


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._current: Form | None = None
        self.alerts: list[str] = []
        self._in_alert = False

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        if tag == "form":
            self._current = Form(
                action=attrs.get("action", ""),
                method=(attrs.get("method") or "get").lower(),
                attrs=attrs,
            )
            self.forms.append(self._current)
        elif self._current is not None and tag in ("input", "button"):
            name = attrs.get("name")
            kind = (attrs.get("type") or ("submit" if tag == "button" else "text")).lower()
            if not name:
                pass
            elif kind == "submit":
                if self._current.submit is None:
                    self._current.submit = (name, attrs.get("value", ""))
            elif kind not in ("checkbox", "radio") or "checked" in attrs:
                self._current.fields[name] = attrs.get("value", "")
                self._current.input_types[name] = kind
        if attrs.get("role") == "alert" or "error" in attrs.get("class", "").split():
            self._in_alert = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None
        if tag in ("p", "div", "span"):
            self._in_alert = False

    def handle_data(self, data: str) -> None:
        if self._in_alert and data.strip():
            self.alerts.append(data.strip())


def parse_forms(html: str) -> tuple[list[Form], list[str]]:
    """The forms of a page and any error/alert texts on it."""
    parser = _FormParser()
    parser.feed(html)
    return parser.forms, parser.alerts


def login_with_requests(
    session: requests.Session,
    start_url: str,
    username: str,
    password: str,
    *,
    provider_url: str | None = None,
    timeout: float = 10,
    max_steps: int = 10,
) -> requests.Response:
    """Log in like a browser: follow redirects from ``start_url`` and submit the identity provider's
    login form (``username``/``password`` fields) and consent form, until a page without a provider
    form is reached. Returns that final response (typically the hub's page after login).

    ``start_url`` is where the flow starts, e.g. the hub's ``/hub/oauth_login?next=/hub/home``.
    If ``provider_url`` is given, only forms on pages under it are submitted.
    Raises :class:`LoginError` if the login form comes back (wrong password) or the flow loops.
    """
    provider_prefix = provider_url.rstrip("/") + "/" if provider_url else None
    response = session.get(start_url, allow_redirects=True, timeout=timeout)
    logged_in = False
    for _ in range(max_steps):
        if provider_prefix and not response.url.startswith(provider_prefix):
            return response
        if provider_prefix and response.status_code >= 400:
            raise LoginError(f"the provider answered {response.status_code} at {response.url}: {response.text[:500]}")
        if "html" not in response.headers.get("Content-Type", ""):
            return response
        forms, alerts = parse_forms(response.text)
        login_form = next((f for f in forms if f.is_login), None)
        consent_form = next(
            (f for f in forms if f.method == "post" and ("consent" in f.attrs.get("id", "") or provider_prefix)),
            None,
        )
        if login_form is not None:
            if logged_in:
                reason = " ".join(alerts) or "the login form was shown again"
                raise LoginError(f"login as {username!r} refused at {response.url}: {reason}")
            form = login_form
            data = dict(form.fields)
            user_field = next(
                (n for n in ("username", "login", "email") if n in form.fields),
                next((n for n, t in form.input_types.items() if t in ("text", "email")), None),
            )
            if user_field is None:
                raise LoginError(f"no user name field in the login form at {response.url}")
            pass_field = next(n for n, t in form.input_types.items() if t == "password")
            data[user_field] = username
            data[pass_field] = password
            logged_in = True
        elif consent_form is not None:
            form = consent_form
            data = dict(form.fields)
        else:
            return response
        if form.submit:
            data.setdefault(*form.submit)
        target = urljoin(response.url, form.action or response.url)
        if form.method == "post":
            response = session.post(target, data=data, allow_redirects=True, timeout=timeout)
        else:
            response = session.get(target, params=data, allow_redirects=True, timeout=timeout)
    raise LoginError(f"login did not finish within {max_steps} form submissions (last page {response.url})")


# ------------------------------------------------------------------------------------------------
# the provider process


@dataclass
class OIDCProvider:
    """A running test provider. URLs are absolute; ``discovery`` is its openid-configuration."""

    process: subprocess.Popen
    issuer: str
    port: int
    discovery: dict
    client_id: str
    client_secret: str
    admin_token: str
    access_token_ttl: int
    log_path: Path
    redirect_uris: list[str] = field(default_factory=list)

    @property
    def authorize_url(self) -> str:
        return self.discovery["authorization_endpoint"]

    @property
    def token_url(self) -> str:
        return self.discovery["token_endpoint"]

    @property
    def userinfo_url(self) -> str:
        return self.discovery["userinfo_endpoint"]

    @property
    def revocation_url(self) -> str:
        return self.discovery["revocation_endpoint"]

    @property
    def introspection_url(self) -> str:
        return self.discovery["introspection_endpoint"]

    @property
    def end_session_url(self) -> str:
        return self.discovery["end_session_endpoint"]

    # -- admin API (test-only endpoints of provider.mjs) --

    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        response = requests.request(
            method,
            f"{self.issuer}/_test/{path}",
            json=payload,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=10,
        )
        if response.status_code != 200:
            raise RuntimeError(f"{method} /_test/{path} -> {response.status_code}: {response.text}")
        return response.json()

    def add_user(self, username: str, password: str, **claims: Any) -> dict:
        """Add (or replace) a user. ``claims`` override the defaults (preferred_username=username,
        name, email, email_verified, ``roles={"group": [], "team": []}``); ``sub`` may be given."""
        spec: dict[str, Any] = {"username": username, "password": password}
        if "sub" in claims:
            spec["sub"] = claims.pop("sub")
        spec["claims"] = claims
        return self._admin("POST", "users", spec)["users"][0]

    def users(self) -> list[dict]:
        return self._admin("GET", "users")["users"]

    def add_redirect_uri(self, uri: str) -> None:
        """Allow one more redirect URI for the client (e.g. a hub's /hub/oauth_callback)."""
        if uri not in self.redirect_uris:
            self.redirect_uris.append(uri)
        self._admin(
            "POST",
            "clients",
            {"client_id": self.client_id, "client_secret": self.client_secret, "redirect_uris": self.redirect_uris},
        )

    def revoke(
        self, username: str, *, refresh_tokens: bool = True, access_tokens: bool = False, sessions: bool = False
    ) -> dict:
        """Revoke a user's refresh tokens (and optionally access tokens and provider sessions).

        Returns the counts removed. Revoking only access tokens (``refresh_tokens=False``) makes the
        next userinfo call with the current access token fail while a refresh still works."""
        return self._admin(
            "POST",
            "revoke",
            {
                "username": username,
                "refresh_tokens": refresh_tokens,
                "access_tokens": access_tokens,
                "sessions": sessions,
            },
        )

    # -- helpers --

    def userinfo(self, access_token: str) -> requests.Response:
        return requests.get(self.userinfo_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)

    def token_is_valid(self, access_token: str) -> bool:
        return self.userinfo(access_token).status_code == 200

    def login_with_requests(
        self, session: requests.Session, start_url: str, username: str, password: str, **kwargs: Any
    ) -> requests.Response:
        return login_with_requests(session, start_url, username, password, provider_url=self.issuer, **kwargs)

    def authenticator_config(self) -> dict[str, Any]:
        """Settings for ``c.GenericOAuthenticator`` (oauthenticator 17 does no discovery)."""
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "authorize_url": self.authorize_url,
            "token_url": self.token_url,
            "userdata_url": self.userinfo_url,
            "scope": ["openid", "profile", "email", "roles", "team", "group"],
            "username_claim": "preferred_username",
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- a hanging provider --

    def pause(self) -> None:
        """Freeze the provider (SIGSTOP): connections are still accepted by the kernel and requests
        queue up unanswered, like an identity provider that hangs."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused provider go on (SIGCONT): it then answers the requests that queued up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """``with provider.paused(): ...`` - the provider hangs inside the block, and always goes on
        after it (other tests share the session's provider)."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def ebrains_auth(provider: OIDCProvider, **ebrains: Any) -> dict[str, Any]:
    """The hub's ``auth`` section for EBRAINS login at ``provider``: its client id and URLs, and a free port
    for the access-token-service. ``ebrains`` adds or overrides keys of ``auth.ebrains`` (who is admitted:
    allowed_groups, allowed_collabs or allow_all; contact, refresh settings, ...). The client secret reaches
    the hub through its environment: ``hub_factory(..., env={"EBRAINS_CLIENT_SECRET": provider.client_secret})``."""
    return {
        "type": "ebrains",
        "ebrains": {
            "client_id": provider.client_id,
            "authorize_url": provider.authorize_url,
            "token_url": provider.token_url,
            "userinfo_url": provider.userinfo_url,
            "token_service_port": free_port(),
            **ebrains,
        },
    }


def hub_with_ebrains(hub_factory, provider: OIDCProvider, overrides: dict, start: bool = True, https: bool = False):
    """A hub of ``hub_factory`` (conftest.py) with EBRAINS login at ``provider``: ``overrides`` (its ``auth`` from
    :func:`ebrains_auth`), the client secret in its environment, and its OAuth callback registered with the provider
    (at ``https://`` when the hub serves TLS) before it starts; started unless not ``start``."""
    hub = hub_factory(overrides, start=False, env={"EBRAINS_CLIENT_SECRET": provider.client_secret})
    if https:
        hub.url = f"https://127.0.0.1:{hub.port}"
    provider.add_redirect_uri(f"{hub.url}/hub/oauth_callback")
    return hub.start() if start else hub


@contextlib.contextmanager
def start_oidc_provider(
    workdir: Path,
    *,
    access_token_ttl: int = DEFAULT_ACCESS_TOKEN_TTL,
    refresh_token_ttl: int = 3600,
    users: list[dict] | None = None,
    consent: str = "form",
    pkce_required: bool = True,
    client_id: str = "spinnaker-jupyter-test",
    client_secret: str | None = None,
    startup_timeout: float = 30,
) -> Iterator[OIDCProvider]:
    """Start tests/oidc/provider.mjs on a free port; stop it on exit."""
    ensure_npm_deps()
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the test OpenID Connect provider (tests/oidc) but is not on PATH")
    workdir.mkdir(parents=True, exist_ok=True)
    users_file = workdir / "oidc-users.json"
    users_file.write_text(json.dumps({"users": users or []}))
    log_path = workdir / "oidc-provider.log"
    ready_path = workdir / "oidc-provider.ready"
    client_secret = client_secret or secrets.token_hex(16)
    admin_token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        OIDC_PORT="0",
        OIDC_HOST="127.0.0.1",
        OIDC_CLIENT_ID=client_id,
        OIDC_CLIENT_SECRET=client_secret,
        OIDC_USERS_FILE=str(users_file),
        OIDC_ACCESS_TOKEN_TTL=str(access_token_ttl),
        OIDC_REFRESH_TOKEN_TTL=str(refresh_token_ttl),
        OIDC_ADMIN_TOKEN=admin_token,
        OIDC_PKCE_REQUIRED="true" if pkce_required else "false",
        OIDC_CONSENT=consent,
    )
    env.pop("OIDC_REDIRECT_URIS", None)
    with open(ready_path, "wb") as out, open(log_path, "wb") as err:
        process = subprocess.Popen(
            [node, str(OIDC_DIR / "provider.mjs")],
            cwd=OIDC_DIR,
            env=env,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    provider: OIDCProvider | None = None
    try:

        def ready() -> dict | None:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the OIDC provider exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
                )
            for line in ready_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if event.get("event") == "ready":
                        return event
            return None

        event = wait_for(
            ready,
            startup_timeout,
            what="the OIDC provider to listen",
            on_timeout=lambda: log_path.read_text(errors="replace"),
        )
        issuer = event["issuer"]

        def discovery() -> dict | None:
            response = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=5)
            return response.json() if response.status_code == 200 else None

        provider = OIDCProvider(
            process=process,
            issuer=issuer,
            port=event["port"],
            discovery=wait_for(discovery, startup_timeout, what="the OIDC discovery document"),
            client_id=client_id,
            client_secret=client_secret,
            admin_token=admin_token,
            access_token_ttl=access_token_ttl,
            log_path=log_path,
        )
        yield provider
    finally:
        if provider is not None:
            provider.stop()
        elif process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OIDCProvider]:
    """A running test OIDC provider shared by the session (access tokens live
    ``DEFAULT_ACCESS_TOKEN_TTL`` seconds). Add users with ``oidc_provider.add_user(...)`` and the
    hub's callback with ``oidc_provider.add_redirect_uri(...)``."""
    with start_oidc_provider(tmp_path_factory.mktemp("oidc")) as provider:
        yield provider
