"""Who is calling: a bearer token becomes a user name, groups and the collabs that user may use.

Two kinds of token are accepted:
* this hub's API tokens (a user's own, or a user server's JUPYTERHUB_API_TOKEN), checked with the hub's REST API
  (`GET /hub/api/user` with that token), and only when the token may use this service
  (`access:services!service=<name>`);
* with `auth: ebrains`, EBRAINS access tokens, checked at the identity provider's userinfo endpoint, the user name
  made the same way as at hub login (usernames.username_from_claims) and admitted by the same groups rules.
Answers are cached for a short time (keyed by a hash of the token) so that a polling client does not hit the hub
or the provider at every request. A refused token is cached too, shorter.

Collabs (the API's `collab` field): everyone has `private-<name>`; hub groups (or EBRAINS groups) map to further
collabs through `jobs.collabs`, and an EBRAINS token's `roles.team` entries (`collab-<collab>-<role>`) add those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from ..usernames import username_from_claims

log = logging.getLogger("spinnaker_jupyter.jobs")


class AuthError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Identity:
    name: str
    groups: list[str] = field(default_factory=list)
    teams: list[str] = field(default_factory=list)  # collabs named by an EBRAINS token's roles.team
    admin: bool = False
    source: str = "hub"

    def collabs(self, collab_map: dict[str, list[str]]) -> list[str]:
        mine = {f"private-{self.name}", *self.teams}
        groups = set(self.groups)
        mine |= {c for c, allowed in collab_map.items() if groups & set(allowed)}
        return sorted(mine)


def token_from_header(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") and token.strip() else None


def _claim(info: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(info, dict):
            return None
        info = info.get(part)
    return info


def teams_to_collabs(teams) -> list[str]:
    """EBRAINS `roles.team` entries are `collab-<collab>-<role>`; the nmpi client reads them the same way."""
    out = []
    for role in teams or []:
        parts = str(role).split("-")
        if len(parts) >= 3 and parts[0] == "collab":
            out.append("-".join(parts[1:-1]))
    return out


class TokenChecker:
    def __init__(self, hub_api_url: str, service_name: str, ebrains: dict | None = None, cache_seconds: int = 60):
        self.hub_api_url = hub_api_url.rstrip("/")
        self.service_name = service_name
        self.ebrains = ebrains  # None: hub tokens only (auth: local)
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Identity | AuthError]] = {}
        self.http = AsyncHTTPClient()

    async def identify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError(
                401,
                "No token: send 'Authorization: Bearer <token>' with a token of this hub (make "
                "one on the hub's Token page)" + (" or an EBRAINS access token" if self.ebrains else "") + ".",
            )
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(key)
        if hit and hit[0] > time.monotonic():
            if isinstance(hit[1], AuthError):
                raise hit[1]
            return hit[1]
        try:
            who = await self._identify(token)
        except AuthError as err:
            if err.status in (401, 403):
                self._cache[key] = (time.monotonic() + min(5, self.cache_seconds), err)
            raise
        self._cache[key] = (time.monotonic() + self.cache_seconds, who)
        if len(self._cache) > 10000:  # bounded: drop what has expired
            t = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > t}
        return who

    async def _identify(self, token: str) -> Identity:
        who = await self._from_hub(token)
        if who is not None:
            return who
        if self.ebrains:
            who = await self._from_ebrains(token)
            if who is not None:
                return who
        raise AuthError(
            401,
            "This token is not valid here: use a token of this hub"
            + (" or a current EBRAINS access token" if self.ebrains else "")
            + ".",
        )

    async def _get(self, url: str, auth: str) -> tuple[int, dict | None]:
        req = HTTPRequest(url, headers={"Authorization": auth}, request_timeout=20)
        try:
            resp = await self.http.fetch(req, raise_error=False)
        except OSError as e:
            raise AuthError(503, f"Cannot check the token right now ({url.split('?')[0]} unreachable: {e}).") from None
        try:
            body = json.loads(resp.body) if resp.body else None
        except ValueError:
            body = None
        return resp.code, body

    async def _from_hub(self, token: str) -> Identity | None:
        code, model = await self._get(f"{self.hub_api_url}/user", f"token {token}")
        if code in (401, 403):
            return None
        if code != 200 or not isinstance(model, dict):
            raise AuthError(503, f"The hub answered {code} when asked about the token; try again shortly.")
        if model.get("kind") != "user":
            raise AuthError(403, "A service's token cannot use the job service: use a user's token.")
        from jupyterhub.services.auth import check_scopes

        scope = f"access:services!service={self.service_name}"
        if not check_scopes(scope, set(model.get("scopes") or [])):
            raise AuthError(
                403,
                f"This token lacks the scope {scope}: make a token without restricted scopes on the hub's Token page.",
            )
        return Identity(
            name=model["name"], groups=list(model.get("groups") or []), admin=bool(model.get("admin")), source="hub"
        )

    async def _from_ebrains(self, token: str) -> Identity | None:
        eb = self.ebrains
        code, info = await self._get(eb["userinfo_url"], f"Bearer {token}")
        if code in (401, 403):
            return None
        if code != 200 or not isinstance(info, dict):
            raise AuthError(503, f"EBRAINS answered {code} when asked about the token; try again shortly.")
        try:
            name = username_from_claims(info)
        except ValueError:
            raise AuthError(403, "The EBRAINS token carries no user name (preferred_username).") from None
        groups = _claim(info, eb["groups_claim"]) or []
        groups = [str(g) for g in groups] if isinstance(groups, list) else []
        allowed = (
            eb["allow_all"]
            or name in eb["allowed_users"]
            or info.get("preferred_username") in eb["allowed_users"]
            or bool(set(groups) & set(eb["allowed_groups"]))
        )
        if not allowed:
            raise AuthError(
                403,
                "Your EBRAINS account is not in the groups allowed to use this SpiNNaker service. "
                f"To get access, ask {eb['contact']}.",
            )
        return Identity(
            name=name,
            groups=groups,
            teams=teams_to_collabs(_claim(info, "roles.team")),
            admin=bool(set(groups) & set(eb["admin_groups"])),
            source="ebrains",
        )


def userinfo(who: Identity, collab_map: dict[str, list[str]]) -> dict:
    """An OpenID Connect userinfo answer for the nmpi client on a local-accounts deployment (it reads
    preferred_username, and roles.team for `my_collabs()`)."""
    return {
        "sub": who.name,
        "preferred_username": who.name,
        "roles": {"team": [f"collab-{c}-editor" for c in who.collabs(collab_map)], "group": who.groups},
    }
