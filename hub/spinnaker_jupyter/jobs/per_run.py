"""Per-run boards for batch jobs (`spinnaker.mode: per-run`): the job's sPyNNaker claims its boards itself at each
setup() from the spalloc service, with the job owner's own EBRAINS access token, as a notebook kernel does.

* The token: the job service asks the hub's access-token-service for the token of the user whose job it runs
  (``?user=<name>`` with its own service token; its role holds only the custom scope that allows this,
  access_token_service.job_owner_grant, wired by jobs/hubconfig.py), right before the job's command runs.
* Where it goes: only into the job's own environment as ``OIDC_BEARER_TOKEN``, what spinnman reads when it has no hub
  token service to ask (a process's environment is readable by its own account and root only; the Slurm executor's
  go file is in the job's root-owned cfg folder, readable by the job's group only). Never in the log, provenance or
  outputs. The job's cfg is the sessions' per-run cfg (`spynnaker_cfg.text(mode="per-run")`, the one builder),
  written to the job's private cfg folder.
* Expiry: spinnman takes the token at each setup() only; the spalloc session it opens then lives on its own
  (cookie and keepalives) until end(). So a run longer than the token's life works; a setup() after the token
  expired is refused by the service (the log gives the time). Kernels ask again at each setup(); a job cannot
  (its environment is fixed), and the hub refreshes a stored login only when its user is active.
* No token (local accounts, the user's login expired, the service unreachable): the job runs virtual and its log
  and provenance say why in one line; with `spinnaker.on_timeout: fail` it ends with that line as its error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import spynnaker_cfg
from .job_boards import write_cfg
from .joblog import JobFailed, JobLog

#: The job service's environment: where the access-token-service answers (set by jobs/hubconfig.py).
TOKEN_URL_ENV = "SPINNAKER_ACCESS_TOKEN_URL"
#: What spinnman reads for its bearer token when it has no hub token service to ask.
TOKEN_ENV = "OIDC_BEARER_TOKEN"


@dataclass(frozen=True)
class OwnerToken:
    """The owner's access token, or why there is none (one line)."""

    token: str | None
    why: str | None = None
    expires_at: float | None = None


def unavailable(auth_type: str, executor: str, token_url: str | None, service_token: str | None) -> str | None:
    """Why no job of this deployment can have its owner's token (None: ask for it at each job)."""
    if auth_type != "ebrains":
        return "a per-run claim needs the user's own EBRAINS token, and this deployment's accounts are local"
    if executor == "docker":
        return "jobs.executor docker gives per-run jobs no network to reach the spalloc service"
    if not token_url or not service_token:
        return f"the job service was not told where the access-token-service is ({TOKEN_URL_ENV})"
    return None


def answer_to_token(status: int, body: bytes | str | None) -> OwnerToken:
    """The access-token-service's answer (JSON) as an OwnerToken; its own message says why when there is none."""
    try:
        data: Any = json.loads(body) if body else None
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    if status == 200 and isinstance(data.get("access_token"), str) and data["access_token"]:
        expires = data.get("expires_at")
        return OwnerToken(data["access_token"], None, float(expires) if isinstance(expires, (int, float)) else None)
    message = " ".join(str(data.get("message") or "").split())
    if data.get("error") in ("login_required", "provider_unavailable") and message:
        return OwnerToken(None, f"no EBRAINS token for the job's owner: {message}")
    return OwnerToken(None, f"the access-token-service answered {status} ({data.get('error') or 'no error code'})")


def until(expires_at: float | None, now: float | None = None) -> str:
    """When the token expires, for the log: 'valid until 14:05 UTC', or that it is not known."""
    if expires_at is None:
        return "its expiry not known"
    left = expires_at - (time.time() if now is None else now)
    return f"valid until {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))}, {max(0, int(left // 60))} min"


class PerRun:
    """The per-run part of the runner: fetches the owner's token and gives the job the per-run cfg and the token."""

    def __init__(
        self,
        spinnaker: dict,
        token_url: str | None,
        service_token: str | None,
        *,
        why_not: str | None = None,
        timeout: float = 40.0,
    ) -> None:
        self.spinnaker, self.token_url, self.service_token = spinnaker, token_url, service_token
        self.why_not, self.timeout = why_not, timeout

    @classmethod
    def from_deployment(cls, d, environ: dict) -> PerRun | None:
        """None unless spinnaker.mode is per-run."""
        if d["spinnaker"]["mode"] != "per-run":
            return None
        url, token = environ.get(TOKEN_URL_ENV), environ.get("JUPYTERHUB_API_TOKEN")
        return cls(
            d["spinnaker"], url, token, why_not=unavailable(d["auth"]["type"], d["jobs"]["executor"], url, token)
        )

    @property
    def spalloc_server(self) -> str | None:
        return spynnaker_cfg.spalloc_server(self.spinnaker["spalloc"]["url"])

    def cfg_text(self) -> str:
        """The cfg a per-run notebook kernel gets: the same builder, the same mode."""
        return spynnaker_cfg.text(self.spinnaker, mode="per-run")

    async def owner_token(self, user: str) -> OwnerToken:
        if self.why_not:
            return OwnerToken(None, self.why_not)
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        try:
            r = await AsyncHTTPClient().fetch(
                f"{self.token_url}?user={quote(user, safe='')}",
                headers={"Authorization": f"token {self.service_token}", "Accept": "application/json"},
                request_timeout=self.timeout,
                raise_error=False,
            )
        except (OSError, HTTPClientError) as e:
            return OwnerToken(None, f"the access-token-service could not be reached ({e})")
        if r.code == 599:
            return OwnerToken(None, f"the access-token-service could not be reached ({r.error})")
        return answer_to_token(r.code, r.body)

    async def prepare(self, cfg_folder: Path, user: str, gid: int | None, jlog: JobLog, provenance: dict) -> dict:
        """Right before the command runs: the job's environment for per-run boards, or {} (virtual, said why);
        JobFailed with `spinnaker.on_timeout: fail`."""
        got = await self.owner_token(user)
        if got.token is None:
            provenance["virtual_reason"] = got.why
            if self.spinnaker.get("on_timeout") == "fail":
                raise JobFailed(f"No SpiNNaker board for this job (spinnaker.mode per-run): {got.why}")
            jlog.note(
                f"This job runs on a VIRTUAL SpiNNaker board (spinnaker.mode per-run: {got.why}): run() maps and "
                "loads the network, but recorded data come back empty."
            )
            return {}
        folder = write_cfg(cfg_folder, self.cfg_text(), gid)
        provenance["virtual_board"] = False
        provenance["board"] = {"per_run": self.spalloc_server, "token_expires_at": got.expires_at}
        jlog.note(
            f"sPyNNaker claims this job's boards itself at each setup() from {self.spalloc_server} with "
            f"{user}'s EBRAINS token ({until(got.expires_at)}; a setup() after that is refused); end() frees them, "
            "else the service does once the job's process has ended (no more keepalives)."
        )
        return {"XDG_CONFIG_DIRS": str(folder), TOKEN_ENV: got.token}


__all__ = ["OwnerToken", "PerRun", "TOKEN_ENV", "TOKEN_URL_ENV", "answer_to_token", "unavailable", "until"]
