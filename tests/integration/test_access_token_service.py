"""access-token-service: unit tests, the test OIDC provider, and end to end with a real hub.

End to end: JupyterHub 6 + configurable-http-proxy + GenericOAuthenticator against the test OIDC
provider (tests/oidc, access tokens living a few seconds), the service run by the hub, and a tiny
stand-in single-user server (to get a real server API token). Fixtures used from conftest:
``chp_command`` (path of configurable-http-proxy) and ``spynnaker_python`` (the sPyNNaker kernel
environment's python, for spinnman's own token lookup).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
import requests

# the `oidc_provider` fixture comes from oidc_fixtures, loaded as a plugin by conftest.py
from oidc_fixtures import LoginError, OIDCProvider, wait_for
from ports import free_port
from spinnaker_jupyter import access_token_service as ats

SERVICE = ats.SERVICE_NAME
#: Refresh the access token when it expires within this many seconds (hub setting in these tests).
REFRESH_MARGIN = 4
#: Authenticator.auth_refresh_age in these tests (must be < REFRESH_MARGIN).
AUTH_REFRESH_AGE = 1
#: Seconds the hub waits for the provider in these tests (auth.ebrains.provider_timeout).
PROVIDER_TIMEOUT = 3


# ================================================================================================
# unit tests (no processes)


def _jwt(payload: dict) -> str:
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'none'})}.{b64(payload)}.sig"


def test_token_from_header():
    assert ats.token_from_header("token abc") == "abc"
    assert ats.token_from_header("Token abc") == "abc"
    assert ats.token_from_header("TOKEN abc") == "abc"
    assert ats.token_from_header("bearer abc") == "abc"
    assert ats.token_from_header("Bearer   abc ") == "abc"
    for bad in (None, "", "abc", "Basic abc", "token", "token a b", "tokenabc"):
        assert ats.token_from_header(bad) is None


def test_expiry_from_stamp_and_jwt():
    assert ats.jwt_expiry(_jwt({"exp": 1234})) == 1234.0
    for bad in ("opaque", "a.b.c", _jwt({"exp": "soon"}), _jwt({"exp": True}), _jwt({}), None):
        assert ats.jwt_expiry(bad) is None
    assert ats.access_token_expires_at(None) is None
    assert ats.access_token_expires_at({"access_token": "opaque"}) is None
    assert ats.access_token_expires_at({"access_token": "opaque", ats.EXPIRES_AT_KEY: 50}) == 50
    assert ats.access_token_expires_at({"access_token": _jwt({"exp": 40}), ats.EXPIRES_AT_KEY: 50}) == 40
    assert ats.access_token_expires_at({"access_token": _jwt({"exp": 60}), ats.EXPIRES_AT_KEY: 50}) == 50


def test_stamp_keeps_expiry_of_the_same_token_and_renews_for_a_new_one():
    first = {"access_token": "t1", "token_response": {"expires_in": 300}}
    stamped = ats.stamp_access_token_expiry(first, None, now=1000)
    assert stamped[ats.EXPIRES_AT_KEY] == 1300
    assert ats.EXPIRES_AT_KEY not in first  # not modified in place
    # the hub re-validated the same token later: the stamp must not move
    again = ats.stamp_access_token_expiry(first, stamped, now=1200)
    assert again[ats.EXPIRES_AT_KEY] == 1300
    # a refreshed token gets its own stamp
    second = {"access_token": "t2", "token_response": {"expires_in": "300"}}
    assert ats.stamp_access_token_expiry(second, stamped, now=1250)[ats.EXPIRES_AT_KEY] == 1550
    # no expires_in: the JWT exp, else unknown
    assert ats.stamp_access_token_expiry({"access_token": _jwt({"exp": 99})}, None)[ats.EXPIRES_AT_KEY] == 99
    assert ats.stamp_access_token_expiry({"access_token": "x"}, None)[ats.EXPIRES_AT_KEY] is None
    assert ats.stamp_access_token_expiry(None, stamped) is None
    hook_result = ats.reconcile_auth_state_hook(None, {"auth_state": first}, None)
    assert hook_result[ats.EXPIRES_AT_KEY] > time.time()


def test_check_interval_follows_short_token_lifetimes():
    authenticator = SimpleNamespace(auth_refresh_age=30, log=ats.tokens.log)
    ats.check_often_enough(authenticator, {"access_token": "t", "token_response": {"expires_in": 300}})
    assert authenticator.auth_refresh_age == 30  # long-lived tokens: the configured interval
    for state in ({"access_token": "t"}, {"access_token": "t", "token_response": {"expires_in": "?"}}, None):
        ats.check_often_enough(authenticator, state)
        assert authenticator.auth_refresh_age == 30  # lifetime unknown: unchanged
    ats.check_often_enough(authenticator, {"access_token": "t", "token_response": {"expires_in": 8}})
    assert authenticator.auth_refresh_age == 4  # every half lifetime
    ats.check_often_enough(authenticator, {"access_token": "t", "token_response": {"expires_in": 300}})
    assert authenticator.auth_refresh_age == 4  # never lengthened again


def test_service_definition_is_least_privilege():
    d = ats.service_definition("http://127.0.0.1:8091", python="/venv/bin/python")
    assert d["service"]["name"] == SERVICE
    assert d["service"]["url"] == "http://127.0.0.1:8091"
    assert d["service"]["command"] == ["/venv/bin/python", "-m", "spinnaker_jupyter.access_token_service"]
    assert "api_token" not in d["service"]  # hub-managed: the hub makes the token
    (role,) = d["roles"]
    assert role["services"] == [SERVICE]
    assert sorted(role["scopes"]) == ["admin:auth_state", "read:users:name"]
    assert d["extra_user_scopes"] == [f"access:services!service={SERVICE}"]
    assert f"access:services!service={SERVICE}" in d["server_token_scopes"]
    assert {"users:activity!user", "access:servers!server"} <= set(d["server_token_scopes"])
    assert d["spawner_environment"] == {"JUPYTERHUB_SERVICE_HOST": "127.0.0.1", "JUPYTERHUB_SERVICE_PORT": "8091"}
    d = ats.service_definition("http://127.0.0.1:8091", user_host="hub.internal", user_port=8000)
    assert d["spawner_environment"] == {"JUPYTERHUB_SERVICE_HOST": "hub.internal", "JUPYTERHUB_SERVICE_PORT": "8000"}
    with pytest.raises(ValueError):
        ats.service_definition("127.0.0.1:8091")


def test_authenticator_settings():
    s = ats.authenticator_settings(refresh_margin=60, auth_refresh_age=30)
    assert s["enable_auth_state"] is True and s["refresh_pre_spawn"] is True
    assert s["auth_refresh_age"] == 30
    assert s["refresh_user_hook"].margin == 60
    assert s["reconcile_auth_state_hook"] is ats.reconcile_auth_state_hook
    # every call to the provider is bounded (tornado's default would be 20 s, per request)
    assert s["http_request_kwargs"] == {
        "connect_timeout": ats.DEFAULT_PROVIDER_TIMEOUT,
        "request_timeout": ats.DEFAULT_PROVIDER_TIMEOUT,
    }
    s = ats.authenticator_settings(provider_timeout=4)
    assert s["http_request_kwargs"] == {"connect_timeout": 4, "request_timeout": 4}
    assert s["refresh_user_hook"].provider_timeout == 4
    for age in (0, 60, 90):
        with pytest.raises(ValueError):
            ats.authenticator_settings(refresh_margin=60, auth_refresh_age=age)
    with pytest.raises(ValueError):
        ats.authenticator_settings(provider_timeout=0)


def test_provider_timeout_comes_from_the_deployment_config(tmp_path, monkeypatch):
    from traitlets.config import Config

    from spinnaker_jupyter import config, hubconfig

    monkeypatch.setenv("EBRAINS_CLIENT_SECRET", "test-secret")
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", secrets.token_hex(32))
    timeouts = {}
    for given in (None, 7):
        ebrains = {"client_id": "spinnaker-jupyter", "allow_all": True}
        if given is not None:
            ebrains["provider_timeout"] = given
        path = tmp_path / f"c{given}.yaml"
        path.write_text(
            json.dumps({"data_dir": str(tmp_path / "data"), "auth": {"type": "ebrains", "ebrains": ebrains}})
        )
        c = Config()
        definition = hubconfig._apply_ebrains(c, config.load([path]))
        a = c.EBRAINSAuthenticator
        timeouts[given] = a.refresh_user_hook.provider_timeout
        assert a.http_request_kwargs == {"connect_timeout": timeouts[given], "request_timeout": timeouts[given]}
        # the service waits for the hub longer than the hub may wait for the provider
        assert float(definition["service"]["environment"][ats.HUB_TIMEOUT_ENV]) > timeouts[given]
    assert timeouts == {None: 10, 7: 7}
    path.write_text(
        json.dumps(
            {"auth": {"type": "ebrains", "ebrains": {"client_id": "x", "allow_all": True, "provider_timeout": 0}}}
        )
    )
    with pytest.raises(config.ConfigError, match="provider_timeout"):
        config.load([path])


def test_oauthenticator_private_api_is_as_checked():
    """The one private oauthenticator API used (access_token_service._auth_model), as checked
    against oauthenticator 17.4.0."""
    import inspect

    from oauthenticator.oauth2 import OAuthenticator

    method = OAuthenticator._token_to_auth_model
    assert inspect.iscoroutinefunction(method)
    assert list(inspect.signature(method).parameters) == ["self", "token_info"]


# ================================================================================================
# the test OIDC provider itself (fast: a client of our own against it)


def _pkce():
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def _authorize_url(p: OIDCProvider, redirect_uri: str, challenge: str | None, scope="openid profile email team group"):
    params = {
        "client_id": p.client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": secrets.token_urlsafe(8),
    }
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    return f"{p.authorize_url}?{urlencode(params)}"


@pytest.fixture(scope="module")
def provider_client(oidc_provider):
    redirect_uri = f"{oidc_provider.issuer}/_test/callback"
    oidc_provider.add_redirect_uri(redirect_uri)
    oidc_provider.add_user(
        "pat",
        "pat-password",
        name="Pat Test",
        given_name="Pat",
        family_name="Test",
        email="pat@example.org",
        roles={"group": ["unit-x"], "team": ["collab-demo-editor"]},
        groups=["unit-x"],
    )
    return redirect_uri


def _code_flow(p: OIDCProvider, redirect_uri: str, scope="openid profile email team group"):
    verifier, challenge = _pkce()
    with requests.Session() as session:
        result = p.login_with_requests(
            session, _authorize_url(p, redirect_uri, challenge, scope), "pat", "pat-password"
        )
    assert result.status_code == 200 and "code" in result.json(), result.text
    response = requests.post(
        p.token_url,
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": result.json()["code"],
            "redirect_uri": redirect_uri,
            "client_id": p.client_id,
            "client_secret": p.client_secret,
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_provider_login_claims_and_refresh(oidc_provider, provider_client):
    p = oidc_provider
    tokens = _code_flow(p, provider_client)
    assert tokens["expires_in"] == p.access_token_ttl
    assert tokens["refresh_token"] and tokens["id_token"]
    info = p.userinfo(tokens["access_token"]).json()
    assert info["preferred_username"] == "pat"
    assert info["name"] == "Pat Test" and info["email"] == "pat@example.org"
    assert info["roles"] == {"group": ["unit-x"], "team": ["collab-demo-editor"]}
    assert "groups" not in info  # the flat list only comes with the `groups` scope
    # refresh: a new access token and a rotated refresh token
    refreshed = requests.post(
        p.token_url,
        timeout=10,
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": p.client_id,
            "client_secret": p.client_secret,
        },
    ).json()
    assert refreshed["access_token"] != tokens["access_token"]
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    assert p.token_is_valid(refreshed["access_token"])
    # revocation through the admin endpoint: the refresh token stops working
    assert p.revoke("pat")["refresh_tokens"] >= 1
    refused = requests.post(
        p.token_url,
        timeout=10,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refreshed["refresh_token"],
            "client_id": p.client_id,
            "client_secret": p.client_secret,
        },
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert p.token_is_valid(refreshed["access_token"])  # access tokens only on request:
    p.revoke("pat", refresh_tokens=False, access_tokens=True)
    assert not p.token_is_valid(refreshed["access_token"])
    # the flat groups list with its own scope
    tokens = _code_flow(p, provider_client, scope="openid profile groups")
    assert p.userinfo(tokens["access_token"]).json()["groups"] == ["unit-x"]


def test_provider_requires_pkce_and_the_right_password(oidc_provider, provider_client):
    p = oidc_provider
    response = requests.get(_authorize_url(p, provider_client, None), allow_redirects=False, timeout=10)
    assert response.status_code in (302, 303)
    query = parse_qs(urlsplit(response.headers["Location"]).query)
    assert query["error"] == ["invalid_request"], query
    with requests.Session() as session, pytest.raises(LoginError, match="Invalid username or password"):
        p.login_with_requests(session, _authorize_url(p, provider_client, _pkce()[1]), "pat", "wrong")


# ================================================================================================
# end to end with a real hub


FAKE_SERVER = textwrap.dedent('''\
    """Stand-in for jupyterhub-singleuser: answers HTTP, and writes the env it was given to a file."""
    import http.server, json, os, signal, urllib.parse
    keys = ["JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_HOST", "JUPYTERHUB_SERVICE_PORT", "JUPYTERHUB_USER"]
    out = os.path.join(os.environ["FAKE_SERVER_ENV_DIR"], os.environ["JUPYTERHUB_USER"] + ".json")
    with open(out + ".tmp", "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
    os.replace(out + ".tmp", out)
    url = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"fake single-user server")

        def log_message(self, *args):
            pass

    def stop(*args):
        os._exit(0)

    signal.signal(signal.SIGINT, stop)  # the hub stops servers with SIGINT, then SIGTERM
    signal.signal(signal.SIGTERM, stop)
    http.server.ThreadingHTTPServer((url.hostname, url.port), Handler).serve_forever()
''')


@dataclass
class Hub:
    url: str
    service_port: int
    helper_token: str
    process: subprocess.Popen
    log_path: Path
    env_dir: Path
    oidc: OIDCProvider

    @property
    def api(self) -> str:
        return f"{self.url}/hub/api"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get_token(self, token: str | None, scheme: str = "token", base: str | None = None) -> requests.Response:
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        return requests.get(f"{base or self.url}/services/{SERVICE}/access-token", headers=headers, timeout=30)

    def access_token(self, token: str) -> dict:
        response = self.get_token(token)
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{self.log_tail()}"
        return response.json()

    def login(self, username: str, password: str) -> requests.Session:
        session = requests.Session()
        final = self.oidc.login_with_requests(
            session, f"{self.url}/hub/oauth_login?next=%2Fhub%2Fhome", username, password
        )
        assert final.status_code == 200 and urlsplit(final.url).path == "/hub/home", (
            f"{final.status_code} {final.url}\n{self.log_tail()}"
        )
        return session

    def _xsrf(self, session: requests.Session) -> dict:
        return {"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")}

    def create_token(self, session: requests.Session, username: str, scopes: list[str] | None = None) -> str:
        """A user API token made by the logged-in user (like the hub's token page does)."""
        body: dict = {"note": "test", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        response = session.post(
            f"{self.api}/users/{quote(username)}/tokens", json=body, headers=self._xsrf(session), timeout=30
        )
        assert response.status_code == 201, f"{response.status_code} {response.text}"
        return response.json()["token"]

    def start_server(self, session: requests.Session, username: str) -> dict:
        """Start the user's (stand-in) server; return the environment it was started with."""
        response = session.post(f"{self.api}/users/{quote(username)}/server", headers=self._xsrf(session), timeout=30)
        assert response.status_code in (201, 202), f"{response.status_code} {response.text}"
        env_file = self.env_dir / f"{username}.json"
        wait_for(env_file.exists, 30, what=f"{username}'s server to start", on_timeout=self.log_tail)
        return json.loads(env_file.read_text())

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the hub (it stops its proxy, services and servers); whatever it started and
        left behind (only if it had to be killed) is killed by process id."""
        started = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        for pid, cmdline in started.items():
            if _cmdline(pid) == cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _descendants(pid: int) -> dict[int, bytes]:
    """Process ids (with their command lines) of all descendants of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, bytes] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        cmdline = _cmdline(child)
        if cmdline is not None:
            found[child] = cmdline
        todo.extend(children.get(child, []))
    return found


def _default_sigint() -> None:
    # a hub started from a background job inherits an ignored SIGINT, and so would its services
    # and servers, which the hub stops with SIGINT first
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _running_hub(
    tmp: Path,
    oidc_provider: OIDCProvider,
    chp_command,
    refresh_margin: float = REFRESH_MARGIN,
    auth_refresh_age: int = AUTH_REFRESH_AGE,
):
    port, hub_port, proxy_api_port, service_port = (free_port() for _ in range(4))
    url = f"http://127.0.0.1:{port}"
    oidc_provider.add_redirect_uri(f"{url}/hub/oauth_callback")
    env_dir = tmp / "server-env"
    env_dir.mkdir()
    (tmp / "fake_server.py").write_text(FAKE_SERVER)
    helper_token = secrets.token_hex(16)
    auth = oidc_provider.authenticator_config()
    config = textwrap.dedent(f'''\
        import sys
        from spinnaker_jupyter.access_token_service import authenticator_settings, service_definition

        c = get_config()  # noqa: F821
        c.JupyterHub.ip = "127.0.0.1"
        c.JupyterHub.port = {port}
        c.JupyterHub.hub_ip = "127.0.0.1"
        c.JupyterHub.hub_port = {hub_port}
        c.ConfigurableHTTPProxy.command = [{str(chp_command)!r}]
        c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
        c.JupyterHub.db_url = "sqlite:///{tmp}/jupyterhub.sqlite"
        c.JupyterHub.cookie_secret_file = "{tmp}/jupyterhub_cookie_secret"
        c.JupyterHub.redirect_to_server = False
        c.JupyterHub.log_level = "DEBUG"

        c.JupyterHub.authenticator_class = "generic-oauth"
        for key, value in {auth!r}.items():
            setattr(c.GenericOAuthenticator, key, value)
        c.GenericOAuthenticator.oauth_callback_url = "{url}/hub/oauth_callback"
        c.GenericOAuthenticator.allow_all = True
        for key, value in authenticator_settings(
            refresh_margin={refresh_margin}, auth_refresh_age={auth_refresh_age}, provider_timeout={PROVIDER_TIMEOUT}
        ).items():
            setattr(c.GenericOAuthenticator, key, value)

        d = service_definition("http://127.0.0.1:{service_port}", user_host="127.0.0.1", user_port={port},
                               provider_timeout={PROVIDER_TIMEOUT})
        c.JupyterHub.services = [
            d["service"],
            {{"name": "test-helper", "api_token": "{helper_token}"}},
        ]
        c.JupyterHub.load_roles = d["roles"]
        c.JupyterHub.extra_user_scopes = d["extra_user_scopes"]
        c.Spawner.server_token_scopes = d["server_token_scopes"]
        c.JupyterHub.spawner_class = "simple"
        c.SimpleLocalProcessSpawner.home_dir_template = "{tmp}/home/{{username}}"
        c.Spawner.cmd = [sys.executable, "{tmp}/fake_server.py"]
        c.Spawner.environment = dict(d["spawner_environment"], FAKE_SERVER_ENV_DIR="{env_dir}")
        c.Spawner.start_timeout = 30
        c.Spawner.http_timeout = 30
    ''')
    (tmp / "jupyterhub_config.py").write_text(config)
    env = dict(os.environ)
    env["JUPYTERHUB_CRYPT_KEY"] = secrets.token_hex(32)
    env["CONFIGPROXY_AUTH_TOKEN"] = secrets.token_hex(16)
    hub_src = str(Path(__file__).resolve().parents[2] / "hub")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (hub_src, env.get("PYTHONPATH")) if p)
    log_path = tmp / "jupyterhub.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_default_sigint,
        )
    hub = Hub(
        url=url,
        service_port=service_port,
        helper_token=helper_token,
        process=process,
        log_path=log_path,
        env_dir=env_dir,
        oidc=oidc_provider,
    )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {process.returncode}:\n{hub.log_tail()}")
            hub_ok = requests.get(f"{url}/hub/api/", timeout=5).status_code == 200
            return hub_ok and requests.get(f"{url}/services/{SERVICE}/", timeout=5).status_code == 200

        wait_for(up, 60, interval=0.2, what="the hub, proxy and access-token-service", on_timeout=hub.log_tail)
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, oidc_provider, chp_command):
    with _running_hub(tmp_path_factory.mktemp("hub"), oidc_provider, chp_command) as running:
        yield running


def _user(oidc_provider: OIDCProvider, name: str, **claims) -> tuple[str, str]:
    password = secrets.token_urlsafe(12)
    claims.setdefault("roles", {"group": [f"group-{name}"], "team": [f"collab-{name}-administrator"]})
    oidc_provider.add_user(name, password, **claims)
    return name, password


def _assert_token_of(oidc: OIDCProvider, access_token: str, username: str) -> None:
    response = oidc.userinfo(access_token)
    assert response.status_code == 200, f"access token refused by the provider: {response.text}"
    assert response.json()["preferred_username"] == username


def test_user_gets_own_access_token(hub, oidc_provider):
    name, password = _user(oidc_provider, "alice")
    session = hub.login(name, password)
    token = hub.create_token(session, name)
    answer = hub.access_token(token)
    assert set(answer) == {"access_token", "token_type", "expires_at"}
    assert answer["token_type"] == "Bearer"
    assert 0 < answer["expires_at"] - time.time() <= oidc_provider.access_token_ttl
    _assert_token_of(oidc_provider, answer["access_token"], name)
    info = oidc_provider.userinfo(answer["access_token"]).json()
    assert info["roles"]["team"] == ["collab-alice-administrator"]
    # every spelling of the scheme that JupyterHub accepts
    for scheme in ("Token", "TOKEN", "bearer", "Bearer"):
        response = hub.get_token(token, scheme=scheme)
        assert response.status_code == 200, response.text
        _assert_token_of(oidc_provider, response.json()["access_token"], name)
    response = hub.get_token(token)
    assert response.headers["Cache-Control"] == "no-store"
    # also straight at the service's own port, at the path spinnman asks for
    response = hub.get_token(token, base=f"http://127.0.0.1:{hub.service_port}")
    assert response.status_code == 200, response.text


def test_missing_and_unacceptable_tokens(hub, oidc_provider):
    name, password = _user(oidc_provider, "mallory")
    session = hub.login(name, password)
    response = hub.get_token(None)
    assert response.status_code == 401 and response.json()["error"] == "missing_token"
    assert "WWW-Authenticate" in response.headers
    response = requests.get(
        f"{hub.url}/services/{SERVICE}/access-token", headers={"Authorization": "Basic bWFsbG9yeTp4"}, timeout=10
    )
    assert response.status_code == 401 and response.json()["error"] == "missing_token"
    response = hub.get_token("not-a-real-token")
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"
    # a service's token: services have no EBRAINS identity
    response = hub.get_token(hub.helper_token)
    assert response.status_code == 403 and response.json()["error"] == "not_a_user"
    # the user's own token, but restricted to scopes that do not include this service
    restricted = hub.create_token(session, name, scopes=[f"read:users:name!user={name}"])
    response = hub.get_token(restricted)
    assert response.status_code == 403 and response.json()["error"] == "insufficient_scope"
    assert "access_token" not in response.json()
    # the hub's cookie does not count: only tokens
    response = session.get(f"{hub.url}/services/{SERVICE}/access-token", timeout=10)
    assert response.status_code == 401


def test_users_only_get_their_own_token(hub, oidc_provider):
    a_name, a_password = _user(oidc_provider, "anna")
    b_name, b_password = _user(oidc_provider, "bert")
    a_token = hub.create_token(hub.login(a_name, a_password), a_name)
    b_session = hub.login(b_name, b_password)
    b_token = hub.create_token(b_session, b_name)
    a_access = hub.access_token(a_token)["access_token"]
    b_access = hub.access_token(b_token)["access_token"]
    assert a_access != b_access
    _assert_token_of(oidc_provider, a_access, a_name)
    _assert_token_of(oidc_provider, b_access, b_name)
    # there is no way to name another user: query parameters and other paths do not help
    response = requests.get(
        f"{hub.url}/services/{SERVICE}/access-token?user={a_name}",
        headers={"Authorization": f"token {b_token}"},
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["access_token"] == b_access
    response = requests.get(
        f"{hub.url}/services/{SERVICE}/access-token/{a_name}", headers={"Authorization": f"token {b_token}"}, timeout=10
    )
    assert response.status_code == 404
    # bert's server token also yields bert's token only
    env = hub.start_server(b_session, b_name)
    server_access = hub.access_token(env["JUPYTERHUB_API_TOKEN"])["access_token"]
    _assert_token_of(oidc_provider, server_access, b_name)


def test_refreshed_before_it_expires_once_for_concurrent_requests(hub, oidc_provider):
    name, password = _user(oidc_provider, "carol")
    session = hub.login(name, password)
    tokens = [hub.create_token(session, name), hub.create_token(session, name)]
    first = hub.access_token(tokens[0])
    # enter the refresh window (the last REFRESH_MARGIN seconds of the token's life) ...
    wait_for(
        lambda: time.time() >= first["expires_at"] - REFRESH_MARGIN + 0.3,
        oidc_provider.access_token_ttl,
        what="the refresh window",
    )
    # ... with a burst of concurrent requests from two tokens of the same user: one refresh only
    # (the provider rotates refresh tokens and revokes the whole grant when one is used twice)
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(hub.get_token, tokens * 3))
    changed_at = time.time()
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    answers = {r.json()["access_token"] for r in responses}
    assert len(answers) == 1, "every request should see the same refreshed token"
    (second,) = answers
    assert second != first["access_token"]
    assert changed_at < first["expires_at"], "the token should be refreshed before it expires"
    assert responses[0].json()["expires_at"] > first["expires_at"]
    _assert_token_of(oidc_provider, second, name)  # (a double refresh would have revoked it)
    # stable afterwards: no refresh on every call
    assert hub.access_token(tokens[1])["access_token"] == second


def test_refreshed_after_it_expired(hub, oidc_provider):
    name, password = _user(oidc_provider, "dave")
    token = hub.create_token(hub.login(name, password), name)
    first = hub.access_token(token)["access_token"]
    # nobody asks the hub about dave until his access token has expired at the provider
    wait_for(
        lambda: not oidc_provider.token_is_valid(first),
        oidc_provider.access_token_ttl + 10,
        interval=0.25,
        what="the access token to expire",
    )
    second = hub.access_token(token)["access_token"]
    assert second != first
    _assert_token_of(oidc_provider, second, name)


def test_tokens_shorter_lived_than_the_check_interval_are_renewed_at_once(tmp_path_factory, oidc_provider, chp_command):
    # the hub's default check interval (auth_refresh_age 30 s) is longer than the provider's access tokens live (8 s):
    # before, the user's server was told "login expired and could not be renewed" from the token's expiry until the
    # next check, ~20 s later (the hub does not consult the authenticator between checks)
    assert oidc_provider.access_token_ttl < ats.DEFAULT_AUTH_REFRESH_AGE
    with _running_hub(
        tmp_path_factory.mktemp("hub-defaults"),
        oidc_provider,
        chp_command,
        refresh_margin=ats.DEFAULT_REFRESH_MARGIN,
        auth_refresh_age=ats.DEFAULT_AUTH_REFRESH_AGE,
    ) as hub:
        name, password = _user(oidc_provider, "kim")
        server_token = hub.start_server(hub.login(name, password), name)["JUPYTERHUB_API_TOKEN"]
        first = hub.access_token(server_token)
        wait_for(
            lambda: time.time() > first["expires_at"] + 0.2,
            oidc_provider.access_token_ttl + 5,
            what="the first access token to expire",
        )
        started = time.monotonic()
        response = hub.get_token(server_token)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, f"{response.text}\n{hub.log_tail()}"
        assert elapsed < PROVIDER_TIMEOUT, f"answered after {elapsed:.1f} s"
        assert response.json()["access_token"] != first["access_token"]
        _assert_token_of(oidc_provider, response.json()["access_token"], name)


def test_refreshed_when_the_provider_revoked_the_access_token(hub, oidc_provider):
    # oauthenticator's own path: the stored token is refused at userinfo -> refresh token is used
    name, password = _user(oidc_provider, "erin")
    token = hub.create_token(hub.login(name, password), name)
    first = hub.access_token(token)["access_token"]
    oidc_provider.revoke(name, refresh_tokens=False, access_tokens=True)
    assert not oidc_provider.token_is_valid(first)

    def renewed():
        answer = hub.access_token(token)["access_token"]
        return answer if answer != first else None

    second = wait_for(renewed, AUTH_REFRESH_AGE + 10, interval=0.25, what="a new access token", on_timeout=hub.log_tail)
    _assert_token_of(oidc_provider, second, name)


def test_revoked_refresh_token_means_login_again(hub, oidc_provider):
    name, password = _user(oidc_provider, "frank")
    session = hub.login(name, password)
    token = hub.create_token(session, name)
    first = hub.access_token(token)
    oidc_provider.revoke(name)  # the refresh tokens; the current access token stays valid

    def refused():
        response = hub.get_token(token)
        if response.status_code == 200:
            # still the old, still valid token: nothing else can be had
            assert response.json()["access_token"] == first["access_token"]
            return None
        return [response]  # (a Response with an error status is falsy)

    (response,) = wait_for(
        refused,
        oidc_provider.access_token_ttl + 10,
        interval=0.25,
        what="the service to ask for a new login",
        on_timeout=hub.log_tail,
    )
    assert time.time() >= first["expires_at"], "503 only once the token has expired"
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "login_required"
    assert "log in" in body["message"] and "/hub/home" in body["message"]
    assert "access_token" not in body
    # after logging in again the user gets a fresh token
    hub.login(name, password)
    answer = hub.access_token(token)
    assert answer["access_token"] != first["access_token"]
    _assert_token_of(oidc_provider, answer["access_token"], name)


def test_spinnman_finds_the_token_from_a_user_server(hub, oidc_provider, spynnaker_python):
    name, password = _user(oidc_provider, "gina")
    session = hub.login(name, password)
    env = hub.start_server(session, name)
    assert env["JUPYTERHUB_USER"] == name
    # the spawner environment from service_definition(): here, the proxy's address
    assert env["JUPYTERHUB_SERVICE_HOST"] == "127.0.0.1"
    assert env["JUPYTERHUB_SERVICE_PORT"] == str(urlsplit(hub.url).port)
    code = "from spinnman.spalloc import spalloc_allocator as m; print(getattr(m, '__bearer_token')())"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "OIDC_"))}
    run_env.update({k: env[k] for k in ("JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_HOST", "JUPYTERHUB_SERVICE_PORT")})
    result = subprocess.run(
        [str(spynnaker_python), "-c", code], env=run_env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    found = result.stdout.strip().splitlines()[-1]
    _assert_token_of(oidc_provider, found, name)
    assert found == hub.access_token(env["JUPYTERHUB_API_TOKEN"])["access_token"]


# ------------------------------------------------------------------------------------------------
# a hanging identity provider (SIGSTOP): nobody waits for anybody else, nobody is logged out


def _ask_concurrently(hub: Hub, tokens: list[str]) -> list[tuple[requests.Response, float]]:
    """Ask the service with every token at once; each answer with its time (seconds from the start)."""
    started = time.monotonic()

    def ask(token: str) -> tuple[requests.Response, float]:
        response = hub.get_token(token)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(len(tokens)) as pool:
        return list(pool.map(ask, tokens))


def test_a_hanging_provider_delays_nobody_and_logs_nobody_out(hub, oidc_provider):
    users = [_user(oidc_provider, name) for name in ("hana", "ivan")]
    tokens, first = {}, {}
    for name, password in users:
        session = hub.login(name, password)
        tokens[name] = [hub.create_token(session, name) for _ in range(2)]
        first[name] = hub.access_token(tokens[name][0])
    with oidc_provider.paused():
        # both users' access tokens expire while the provider cannot renew them ...
        wait_for(
            lambda: time.time() > max(a["expires_at"] for a in first.values()) + 0.2,
            oidc_provider.access_token_ttl + 5,
            what="the access tokens to expire",
        )
        # ... and two requests per user come in at once
        answers = _ask_concurrently(hub, [t for name in tokens for t in tokens[name]])
        times = sorted(round(elapsed, 1) for _, elapsed in answers)
        print(f"answer times of 4 concurrent requests (2 users) with the provider stopped: {times} s")
        for response, _ in answers:
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error"] == "provider_unavailable", body
            assert "not answering" in body["message"] and "try again in a minute" in body["message"]
            assert "expired" not in body["message"] and "access_token" not in body
        # answered together after the provider timeout: had one user's requests waited for the other's, the last
        # answer would have come a whole provider timeout after the first. (The spread, not the last answer's time:
        # a loaded machine delays all four answers alike, which says nothing about one waiting for another.)
        spread = max(elapsed for _, elapsed in answers) - min(elapsed for _, elapsed in answers)
        assert spread < PROVIDER_TIMEOUT, times
        # asked again meanwhile: the same clear answer, at once
        response = hub.get_token(tokens["hana"][1])
        assert response.status_code == 503 and response.json()["error"] == "provider_unavailable"
    # the provider goes on and answers the refresh requests that waited for it: nobody has to log
    # in again (a refresh token redeemed twice would have revoked the user's whole grant)
    for name, _ in users:

        def renewed(name=name):
            response = hub.get_token(tokens[name][0])
            assert response.json().get("error") != "login_required", f"{name}: {response.text}\n{hub.log_tail()}"
            return response.json() if response.status_code == 200 else None

        second = wait_for(renewed, 10, interval=0.25, what=f"{name}'s renewed access token", on_timeout=hub.log_tail)
        assert second["access_token"] != first[name]["access_token"]
        _assert_token_of(oidc_provider, second["access_token"], name)
        # the refresh token the hub kept is the one the provider issued last: it renews again
        third = wait_for(
            lambda: (lambda a: a if a["access_token"] != second["access_token"] else None)(
                hub.access_token(tokens[name][1])
            ),
            oidc_provider.access_token_ttl + 10,
            interval=0.25,
            what=f"{name}'s next access token",
            on_timeout=hub.log_tail,
        )
        _assert_token_of(oidc_provider, third["access_token"], name)


def test_a_still_valid_token_is_served_while_the_provider_hangs(hub, oidc_provider):
    name, password = _user(oidc_provider, "jack")
    token = hub.create_token(hub.login(name, password), name)
    first = hub.access_token(token)
    # in the refresh window the hub renews the token; the provider hangs just then
    wait_for(
        lambda: time.time() >= first["expires_at"] - REFRESH_MARGIN + 0.3,
        oidc_provider.access_token_ttl,
        what="the refresh window",
    )
    with oidc_provider.paused():
        answers = _ask_concurrently(hub, [token, token])
        print(
            f"answer times with a still-valid token, the provider stopped: "
            f"{sorted(round(elapsed, 1) for _, elapsed in answers)} s"
        )
        for response, elapsed in answers:
            assert response.status_code == 200, response.text
            assert response.json()["access_token"] == first["access_token"]
            assert elapsed < PROVIDER_TIMEOUT, f"waited {elapsed:.1f} s for the provider instead of serving the token"
        assert time.time() < first["expires_at"], "served while still valid"
    # the refresh that was pending lands once the provider answers
    second = wait_for(
        lambda: (lambda a: a if a["access_token"] != first["access_token"] else None)(hub.access_token(token)),
        10,
        interval=0.25,
        what="the renewed token",
        on_timeout=hub.log_tail,
    )
    _assert_token_of(oidc_provider, second["access_token"], name)
