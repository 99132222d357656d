"""EBRAINS login: oauthenticator's GenericOAuthenticator, configured for EBRAINS IAM (Keycloak, realm hbp).

The subclass only turns an unreachable identity provider into a clear page; everything else is upstream config
(see hubconfig._apply_ebrains).
"""

from __future__ import annotations

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import Unicode


class EBRAINSAuthenticator(GenericOAuthenticator):
    provider_name = Unicode("EBRAINS", help="Name of the identity provider in messages.").tag(config=True)

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
