"""HTTPS on the public port, and the cookies an iframe on another site needs.

configurable-http-proxy serves TLS itself (JupyterHub passes `ssl_key` / `ssl_cert` on as --ssl-key / --ssl-cert) and
answers plain HTTP on another port with a redirect (its own --redirect-port). Browsers send a cookie to a page framed
by another site only when it was set `SameSite=None; Secure` (and `Partitioned` where third-party cookies are
blocked), and accept Secure cookies only over HTTPS: so those options are set, on the hub and on user servers, only
when the service is reached over HTTPS (built in here, or by the operator's reverse proxy named in hub.public_url).
"""

from __future__ import annotations

import stat
from pathlib import Path

import spinnaker_framing  # (the extension distribution's, standard library only: the servers frame alike)

from .config import ConfigError, Deployment
from .preflight import trusted


def enabled(d: Deployment) -> bool:
    return bool(d["hub"]["tls"]["cert_file"])


def served_over_https(d: Deployment) -> bool:
    return enabled(d) or (d["hub"]["public_url"] or "").startswith("https://")


def _pem(path: Path, key: str, marker: str, what: str) -> None:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"hub.tls.{key}: no such file {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"hub.tls.{key}: {path} is a folder; point it at the PEM file holding {what}") from None
    except OSError as e:
        raise ConfigError(f"hub.tls.{key}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in text or marker.encode() not in text:
        raise ConfigError(
            f"hub.tls.{key}: {path} holds no PEM {what} (no '-----BEGIN ...{marker}' line); give "
            f"the PEM file (with certbot: /etc/letsencrypt/live/<name>/"
            f"{'fullchain' if key == 'cert_file' else 'privkey'}.pem)"
        )


def check(d: Deployment) -> None:
    """Both files or neither; PEM; nothing another account could have written; the key readable by no one else."""
    tls = d["hub"]["tls"]
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        given, missing = ("cert_file", "key_file") if tls["cert_file"] else ("key_file", "cert_file")
        raise ConfigError(
            f"hub.tls.{missing}: required with hub.tls.{given} (the certificate and its private key go together)"
        )
    if not tls["cert_file"]:
        if tls["http_redirect_port"]:
            raise ConfigError("hub.tls.http_redirect_port: redirects to HTTPS need hub.tls.cert_file and key_file")
        return
    cert, key = d.path(tls["cert_file"], Path()), d.path(tls["key_file"], Path())
    _pem(cert, "cert_file", "CERTIFICATE", "certificate")
    _pem(key, "key_file", "PRIVATE KEY", "private key")
    trusted(cert, "hub.tls.cert_file:")
    trusted(key, "hub.tls.key_file:")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & 0o007:
        raise ConfigError(
            f"hub.tls.key_file: {key} is readable by every account (mode "
            f"{mode:04o}), so anyone on this machine could impersonate the service. `chmod 600 {key}` "
            "(or 640 with a group only the hub's account is in), and replace the certificate if "
            "others may have read it."
        )
    if tls["http_redirect_port"] == d["hub"]["port"]:
        raise ConfigError("hub.tls.http_redirect_port: must differ from hub.port (HTTPS is served there)")


def apply(c, d: Deployment, headers: dict, server_settings: dict) -> None:
    """HTTPS on the proxy, HSTS, and cookies that work inside a frame of another site (hub and user servers)."""
    tls, hub = d["hub"]["tls"], d["hub"]
    if enabled(d):
        c.JupyterHub.ssl_cert = str(d.path(tls["cert_file"], Path()))
        c.JupyterHub.ssl_key = str(d.path(tls["key_file"], Path()))
        if tls["http_redirect_port"]:
            c.ConfigurableHTTPProxy.command = [
                *c.ConfigurableHTTPProxy.command,
                "--redirect-port",
                str(tls["http_redirect_port"]),
            ]
    if served_over_https(d) and tls["hsts_max_age"]:
        headers["Strict-Transport-Security"] = f"max-age={tls['hsts_max_age']}"
    if hub["frame_ancestors"] and served_over_https(d):
        # SameSite=None; Secure; Partitioned (see spinnaker_framing, which also covers logouts).
        # The hub's cookies (its _xsrf follows them), and user servers' login cookies: JupyterHub hands them on
        # as JUPYTERHUB_COOKIE_OPTIONS, which also tells their extension to frame every cookie.
        c.JupyterHub.tornado_settings["cookie_options"] = dict(spinnaker_framing.FRAMED)
        spinnaker_framing.frame_cookies()  # this (the hub's) process
        server_settings["xsrf_cookie_kwargs"] = dict(spinnaker_framing.FRAMED)  # the user server's _xsrf
    elif hub["frame_ancestors"]:
        print(
            "[spinnaker-jupyter] hub.frame_ancestors: a page of another site may show the hub, but logging in "
            "inside its frame fails over plain HTTP (browsers keep a framed site's cookies only over HTTPS). Set "
            "hub.tls.cert_file and key_file, or hub.public_url to the https:// address of your reverse proxy.",
            flush=True,
        )
