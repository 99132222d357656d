"""Hub side: the endpoint that renews a user's stored login now, for the service's job-owner answers.

``POST /hub/api/spinnaker/access-token-service/refresh/<name>`` (``admin:auth_state``, which the service holds and
which already reads every stored token: renewing one is no more) runs the authenticator's ``refresh_user``, so this
package's refresh hook (refresh.py: one refresh per user at a time, the result stored in auth_state by the hook
itself). The hub renews a login only at requests made as that user; a batch job's owner may make none while a long
job runs, and the job's later sPyNNaker setup() still needs a valid token. Registered only with per-run boards and
the job service (jobs/hubconfig.py), through ``JupyterHub.extra_handlers`` as the board and course endpoints are.
"""

from __future__ import annotations

import json

from .tokens import REFRESH_API_PATH


def handlers() -> list:
    from jupyterhub.apihandlers.base import APIHandler
    from jupyterhub.scopes import needs_scope
    from tornado import web

    class RefreshLoginHandler(APIHandler):
        @needs_scope("admin:auth_state")
        async def post(self, user_name: str) -> None:
            user = self.find_user(user_name)
            if user is None:
                raise web.HTTPError(404, f"No user {user_name}")
            # the hook stores what it got (auth_state) itself; False: the provider refused, a new login is needed
            renewed = await self.authenticator.refresh_user(user, self)
            self.set_status(200 if renewed else 409)
            message = "renewed or still valid" if renewed else f"{user_name} must log in again"
            self.finish(json.dumps({"renewed": bool(renewed), "message": message}))

    return [("/api" + REFRESH_API_PATH + r"/([^/]+)", RefreshLoginHandler)]  # (the hub adds its /hub/ prefix)
