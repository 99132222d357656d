"""The hub embedded in a page of another site (an EBRAINS collab) over HTTPS: hub.tls served by the proxy itself,
plain HTTP redirected, HSTS, and cookies (SameSite=None; Secure) that let the user log in and stay logged in inside
the frame, in headless Chromium. The certificates come from a throw-away CA made here."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import ssl
import threading
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, free_port
from oidc_fixtures import ebrains_auth, hub_with_ebrains

ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HUB_HOST, COLLAB_HOST = "hub.test", "collab.test"  # two sites, both mapped to 127.0.0.1 inside Chromium
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules=MAP {HUB_HOST} 127.0.0.1, MAP {COLLAB_HOST} 127.0.0.1",
]


# --- a throw-away certificate authority ----------------------------------------------------------------------------


def make_certificates(folder: Path, ca_pair=None) -> dict:
    """A CA (or the one given), and a server certificate it signed for hub.test, collab.test, localhost and
    127.0.0.1, written into `folder` (replacing the files there atomically, as certbot's renewal does)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spinnaker-jupyter test CA")])
    ca = (
        ca_pair[1]
        if ca_pair
        else (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
    )
    ca_key = ca_pair[0] if ca_pair else ca_key
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.DNSName(HUB_HOST),
        x509.DNSName(COLLAB_HOST),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HUB_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "fullchain.pem", folder / "privkey.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    for path, data, mode in (
        (
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            0o600,
        ),
        (cert_file, cert_pem + ca.public_bytes(serialization.Encoding.PEM), 0o644),
    ):
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # Chromium trusts exactly this key (and no other bad certificate): the test's stand-in for a CA in its store.
    return {
        "ca": ca_file,
        "cert": cert_file,
        "key": key_file,
        "ca_pair": (ca_key, ca),
        "cert_pem": cert_pem.decode(),
        "spki_sha256": base64.b64encode(hashlib.sha256(spki).digest()).decode(),
    }


@contextlib.contextmanager
def collab_page(port: int, certs: dict, hub_url: str):
    """The collab's page, on another site (https://collab.test:port/), embedding the hub in an iframe."""
    html = (
        f"<!DOCTYPE html><html><head><title>A collab</title></head><body><h1>SpiNNaker in a collab</h1>"
        f"<iframe id=hub src='{hub_url}' style='width:1200px;height:800px'></iframe></body></html>"
    ).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["cert"], certs["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://{COLLAB_HOST}:{port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def trust_ca(certs):
    """requests, in this process, trusts the throw-away CA (RunningHub.start waits on the hub with it)."""
    saved = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(certs["ca"])
    yield
    if saved is None:
        os.environ.pop("REQUESTS_CA_BUNDLE", None)
    else:
        os.environ["REQUESTS_CA_BUNDLE"] = saved


@pytest.fixture(scope="module")
def tls_hub(hub_factory, certs, trust_ca):
    page_port, redirect_port = free_port(), free_port()
    hub = hub_factory(
        {
            "hub": {
                "tls": {
                    "cert_file": str(certs["cert"]),
                    "key_file": str(certs["key"]),
                    "http_redirect_port": redirect_port,
                },
                "frame_ancestors": [f"https://{COLLAB_HOST}:{page_port}"],
            }
        },
        start=False,
    )
    hub.url = f"https://localhost:{hub.port}"  # what the test's own requests use
    hub.start()
    hub.page_port, hub.redirect_port = page_port, redirect_port
    return hub


def test_https_is_served_with_hsts_and_plain_http_is_redirected(tls_hub, certs):
    r = requests.get(f"{tls_hub.url}/hub/login", timeout=10, verify=str(certs["ca"]))
    assert r.status_code == 200
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert f"frame-ancestors 'self' https://{COLLAB_HOST}:{tls_hub.page_port}" in r.headers["Content-Security-Policy"]
    # The cookies a framed login needs: SameSite=None, Secure, and Partitioned (kept where third-party cookies are
    # blocked, per embedding site).
    [xsrf] = [h for h in r.raw.headers.getlist("Set-Cookie") if h.startswith("_xsrf=")]
    assert {"SameSite=None", "Secure", "Partitioned"} <= {a.strip() for a in xsrf.split(";")}, xsrf
    # Plain HTTP on the hub's port gets nothing; on the redirect port, a redirect to HTTPS.
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://localhost:{tls_hub.port}/hub/login", timeout=10)
    r = requests.get(
        f"http://localhost:{tls_hub.redirect_port}/hub/login?next=%2Fhub%2F", timeout=10, allow_redirects=False
    )
    assert (
        r.status_code == 301 and r.headers["Location"] == f"https://localhost:{tls_hub.port}/hub/login?next=%2Fhub%2F"
    )


@pytest.mark.browser
def test_login_inside_a_collab_page_on_another_site_stays_logged_in(tls_hub, certs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (make test-deps does)")
    password = tls_hub.add_user("framed")
    hub_url = f"https://{HUB_HOST}:{tls_hub.port}/hub/"
    with collab_page(tls_hub.page_port, certs, hub_url) as page_url, playwright.sync_playwright() as p:
        # A profile as Chrome ships it to most people: third-party cookies (and storage) allowed. Debian's headless
        # Chromium here blocks them by default: the login still works (Partitioned cookies), but JupyterLab needs
        # localStorage, which such a browser refuses to a framed site (README: embedding in a collab).
        profile = tmp_path / "profile"
        (profile / "Default").mkdir(parents=True)
        (profile / "Default" / "Preferences").write_text(
            json.dumps({"profile": {"cookie_controls_mode": 0, "block_third_party_cookies": False}})
        )
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=[*FLAGS, f"--ignore-certificate-errors-spki-list={certs['spki_sha256']}"],
        )
        try:
            page = context.new_page()
            page.goto(page_url)
            frame = page.frame_locator("#hub")
            frame.locator("input[name=username]").fill("framed")
            frame.locator("input[name=password]").fill(password)
            frame.locator("input[type=submit], button[type=submit]").first.click()
            # Spawned and JupyterLab (with the sPyNNaker kernel in its launcher) inside the frame.
            frame.get_by_text("sPyNNaker", exact=True).first.wait_for(timeout=120_000)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "embedded-jupyterlab.png"))
            assert page.url == page_url  # the collab page itself never navigated away
            cookies = {c["name"]: c for c in context.cookies() if c["domain"] == HUB_HOST}
            for name in ("jupyterhub-hub-login", "jupyterhub-user-framed", "_xsrf"):
                assert cookies[name]["secure"] and cookies[name]["sameSite"] == "None", cookies.get(name)
                assert cookies[name].get("partitionKey") == f"https://{COLLAB_HOST}", cookies[name]
            # The collab page opened again later: still logged in inside the frame, straight into JupyterLab.
            page.reload()
            frame = page.frame_locator("#hub")
            frame.get_by_text("sPyNNaker", exact=True).first.wait_for(timeout=60_000)
            assert frame.locator("input[name=password]").count() == 0
            page.screenshot(path=str(ARTIFACTS / "embedded-jupyterlab-again.png"))
            # Logging out inside the frame logs out: its cookies are cleared there too.
            page.evaluate("url => { document.getElementById('hub').src = url; }", hub_url + "logout")
            frame.locator("input[name=password]").wait_for(timeout=30_000)
            page.reload()
            page.frame_locator("#hub").locator("input[name=password]").wait_for(timeout=30_000)
        finally:
            context.close()


def served_certificate(port: int) -> str:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=10)


def test_a_renewed_certificate_is_served_after_the_documented_deploy_hook(tls_hub, certs):
    """README: certbot's --deploy-hook ends the proxy (its pid file); the hub starts it again, with the renewed
    certificate, and puts the routes back (user servers keep running)."""
    from hubclient import wait_for

    assert served_certificate(tls_hub.port) == certs["cert_pem"]
    renewed = make_certificates(certs["cert"].parent, certs["ca_pair"])
    certs.update(renewed)  # (the module's later tests trust the renewed key)
    pid_file = Path(tls_hub.config["data_dir"]) / "hub" / "proxy.pid"
    os.kill(int(pid_file.read_text()), 15)  # what the deploy hook does: kill "$(cat DATA_DIR/hub/proxy.pid)"

    def new_one():
        with contextlib.suppress(OSError):
            return served_certificate(tls_hub.port) == renewed["cert_pem"]

    wait_for(new_one, 60, "the proxy to serve the renewed certificate")
    # ... and the hub puts its routes back (a few seconds of 404 meanwhile).
    wait_for(
        lambda: requests.get(f"{tls_hub.url}/hub/api/", timeout=10, verify=str(certs["ca"])).status_code == 200,
        30,
        "the hub's routes to be back on the restarted proxy",
    )


@pytest.mark.browser
def test_where_third_party_cookies_are_blocked_the_framed_login_still_works(tls_hub, certs, tmp_path):
    """Debian's headless Chromium blocks third-party cookies by default: only Partitioned cookies are kept in the
    frame. The login there reaches the user's server (JupyterLab itself then lacks localStorage: README)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (make test-deps does)")
    password = tls_hub.add_user("blocked")
    with (
        collab_page(tls_hub.page_port, certs, f"https://{HUB_HOST}:{tls_hub.port}/hub/") as page_url,
        playwright.sync_playwright() as p,
    ):
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=[*FLAGS, f"--ignore-certificate-errors-spki-list={certs['spki_sha256']}"],
        )
        try:
            page = context.new_page()
            page.goto(page_url)
            frame = page.frame_locator("#hub")
            frame.locator("input[name=username]").fill("blocked")
            frame.locator("input[name=password]").fill(password)
            with page.expect_event("framenavigated", lambda f: "/user/blocked/lab" in f.url, timeout=120_000):
                frame.locator("input[type=submit], button[type=submit]").first.click()
        finally:
            context.close()


def test_ebrains_login_over_https(hub_factory, oidc_provider, certs, trust_ca):
    """The OAuth callback and the access-token-service work on the HTTPS address (public_url defaults to https)."""
    hub = hub_with_ebrains(
        hub_factory,
        oidc_provider,
        {
            "hub": {
                "tls": {"cert_file": str(certs["cert"]), "key_file": str(certs["key"])},
                "frame_ancestors": ["https://wiki.ebrains.eu"],
            },
            "auth": ebrains_auth(oidc_provider, allowed_collabs={"spinnaker-course": "viewer"}),
        },
        https=True,
    )
    oidc_provider.add_user(
        "tls-member", "pw-tls-member-1", roles={"group": [], "team": ["collab-spinnaker-course-viewer"]}
    )
    session = requests.Session()
    final = oidc_provider.login_with_requests(
        session, f"{hub.url}/hub/oauth_login?next=/hub/home", "tls-member", "pw-tls-member-1"
    )
    assert final.status_code == 200 and final.url == f"{hub.url}/hub/home", (final.status_code, final.url)
    login = next(c for c in session.cookies if c.name == "jupyterhub-hub-login")
    assert login.secure
    token = session.post(
        f"{hub.url}/hub/api/users/tls-member/tokens",
        json={"expires_in": 600},
        headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")},
    ).json()["token"]
    r = requests.get(
        f"{hub.url}/services/access-token-service/access-token", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200 and oidc_provider.token_is_valid(r.json()["access_token"]), r.text[:300]


# --- the key file ---------------------------------------------------------------------------------------------------


def test_a_key_readable_by_others_is_refused_naming_the_path_and_the_fix(tmp_path, certs):
    from spinnaker_jupyter import config

    key = tmp_path / "privkey.pem"
    key.write_bytes(certs["key"].read_bytes())
    key.chmod(0o644)
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "hub": {"tls": {"cert_file": str(certs["cert"]), "key_file": str(key)}},
            }
        )
    )
    with pytest.raises(config.ConfigError) as e:
        config.load([path])
    message = str(e.value)
    assert len(message.splitlines()) == 1 and str(key) in message and f"chmod 600 {key}" in message, message
    key.chmod(0o600)
    assert config.load([path])["hub"]["tls"]["key_file"] == str(key)


@pytest.mark.parametrize(
    "tls, expected",
    [
        ({"cert_file": "fullchain.pem"}, "hub.tls.key_file: required with hub.tls.cert_file"),
        ({"http_redirect_port": 8080}, "hub.tls.http_redirect_port: redirects to HTTPS need hub.tls.cert_file"),
    ],
)
def test_incomplete_tls_settings_are_one_line(tmp_path, tls, expected):
    from spinnaker_jupyter import config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "hub": {"tls": tls}}))
    with pytest.raises(config.ConfigError) as e:
        config.load([path])
    assert str(e.value).startswith(expected), str(e.value)
