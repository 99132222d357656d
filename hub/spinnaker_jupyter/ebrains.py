"""EBRAINS login: oauthenticator's GenericOAuthenticator, configured for EBRAINS IAM (Keycloak, realm hbp).

The subclass turns an unreachable identity provider into a clear page, and adds collab memberships (the
`roles.team` claim, see collabs.py) to the user's groups through oauthenticator's public `get_user_groups` hook;
admission and admin rights stay upstream's `allowed_groups` / `admin_groups` (see hubconfig._apply_ebrains).

Membership is read again after the login too, through oauthenticator's `refresh_user` (its token refresh is
access_token_service's hook): at every spawn (`refresh_pre_spawn`), at a user's requests once `auth_refresh_age` has
passed, and every `membership_check_interval` seconds for each user with a server running. A refresh that finds
the user no longer admitted stops their servers and refuses the request with `custom_403_message` (one line naming
whom to ask); a lost admin collab or group drops admin rights (upstream applies the refreshed model's `admin`).
"""

from __future__ import annotations

import asyncio
import contextlib

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import Dict, Integer, Unicode

from . import collabs, upstream


class EBRAINSAuthenticator(GenericOAuthenticator):
    provider_name = Unicode("EBRAINS", help="Name of the identity provider in messages.").tag(config=True)
    allowed_collabs = Dict(
        help="collab -> the least role (viewer, editor, administrator) admitted. Members become "
        "hub groups collab-<collab>-<role>; list those in allowed_groups."
    ).tag(config=True)
    admin_collabs = Dict(help="collab -> the least role that makes hub admins (as allowed_collabs).").tag(config=True)
    team_claim = Unicode("roles.team", help="Dotted path of the userinfo claim listing collab memberships.").tag(
        config=True
    )
    membership_check_interval = Integer(
        300,
        help="Seconds between checks that the owners of running servers are "
        "still admitted (0: only at spawns and requests).",
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._membership_watch = None
        with contextlib.suppress(RuntimeError):  # made inside the hub's event loop: watch the running servers' owners
            asyncio.get_running_loop()
            if self.membership_check_interval and self._admits_by_membership():
                self._membership_watch = asyncio.ensure_future(self._check_running_servers())

    def _admits_by_membership(self) -> bool:
        return bool(self.manage_groups and self.allowed_groups) and not self.allow_all

    async def refresh_user(self, user, handler=None, **kwargs):
        refreshed = await super().refresh_user(user, handler, **kwargs)
        # True (nothing new, or the provider is not answering: nobody is refused for that) and False (log in again)
        # say nothing about membership; a fresh model does.
        if (
            isinstance(refreshed, dict)
            and self._admits_by_membership()
            and not await self.check_allowed(user.name, refreshed)
        ):
            self.log.warning(
                "%s is no longer in a group or collab admitted: refused, and their servers stopped", user.name
            )
            for name, spawner in list(user.spawners.items()):
                if spawner.active:
                    asyncio.ensure_future(upstream.stop_server(self, user, name))
            raise web.HTTPError(403, self.custom_403_message)
        return refreshed

    async def _check_running_servers(self):
        while True:
            await asyncio.sleep(self.membership_check_interval)
            for user in upstream.users_with_servers(self):
                try:
                    await self.refresh_user(user)
                except web.HTTPError:
                    pass  # refused: refresh_user has stopped their servers
                except Exception:
                    self.log.exception("Checking whether %s is still admitted failed", user.name)

    async def get_user_groups(self, auth_state: dict):
        groups = await super().get_user_groups(auth_state)
        wanted = set(self.allowed_collabs) | set(self.admin_collabs)
        if wanted:
            team = auth_state.get(self.user_auth_state_key) or {}
            for key in self.team_claim.split("."):
                team = team.get(key) if isinstance(team, dict) else None
            groups |= collabs.groups_for(team, wanted)
        return groups

    async def fetch(self, req, label="fetching", parse_json=True, **kwargs):
        try:
            return await super().fetch(req, label=label, parse_json=parse_json, **kwargs)
        except (OSError, HTTPClientError) as e:
            if isinstance(e, HTTPClientError) and e.code != 599:  # the provider answered: upstream handles it
                raise
            self.log.error("%s login could not reach %s: %s", self.provider_name, req.url, e)
            raise web.HTTPError(
                503,
                f"{self.provider_name} login cannot be reached right now, so you cannot sign "
                "in. Please try again in a few minutes. Servers that are already running and "
                "your files are not affected.",
            ) from None
