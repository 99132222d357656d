"""EBRAINS login: oauthenticator's GenericOAuthenticator, configured for EBRAINS IAM (Keycloak, realm hbp).

The subclass turns an unreachable identity provider into a clear page, and adds collab memberships (the
`roles.team` claim, see collabs.py) to the user's groups through oauthenticator's public `get_user_groups` hook;
admission and admin rights stay upstream's `allowed_groups` / `admin_groups` (see hubconfig._apply_ebrains).
"""

from __future__ import annotations

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import Dict, Unicode

from . import collabs


class EBRAINSAuthenticator(GenericOAuthenticator):
    provider_name = Unicode("EBRAINS", help="Name of the identity provider in messages.").tag(config=True)
    allowed_collabs = Dict(help="collab -> the least role (viewer, editor, administrator) admitted. Members become "
                                "hub groups collab-<collab>-<role>; list those in allowed_groups.").tag(config=True)
    admin_collabs = Dict(help="collab -> the least role that makes hub admins (as allowed_collabs).").tag(config=True)
    team_claim = Unicode("roles.team", help="Dotted path of the userinfo claim listing collab memberships.").tag(
        config=True)

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
            raise web.HTTPError(503, f"{self.provider_name} login cannot be reached right now, so you cannot sign "
                                     "in. Please try again in a few minutes. Servers that are already running and "
                                     "your files are not affected.") from None
