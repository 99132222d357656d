"""The hub's REST API for boards: ``GET /hub/api/spinnaker/boards[/<user>[/<server>]]`` (see the package doc)."""

from __future__ import annotations

import json


def handlers() -> list:
    from jupyterhub import orm
    from jupyterhub.apihandlers.base import APIHandler
    from jupyterhub.scopes import needs_scope
    from tornado import web

    class ServerBoardsHandler(APIHandler):
        """One server's boards: for the user, admins and the server itself (its JUPYTERHUB_API_TOKEN)."""

        @needs_scope("read:servers", "access:servers")
        async def get(self, user_name: str, server_name: str = "") -> None:
            user = self.find_user(user_name)
            if user is None or server_name not in user.orm_user.orm_spawners:
                raise web.HTTPError(404, f"No server {user_name}/{server_name}")
            spawner = user.spawners[server_name]
            if not hasattr(spawner, "board_status"):
                self.write(
                    json.dumps(
                        {
                            "user": user_name,
                            "server": server_name,
                            "mode": None,
                            "message": "this server's spawner does not manage SpiNNaker boards",
                        }
                    )
                )
                return
            live = self.get_argument("live", "1") not in ("0", "false", "no")
            self.write(json.dumps(await spawner.board_status(live=live)))

    class AllBoardsHandler(APIHandler):
        """Every running server's boards (admins)."""

        @needs_scope("admin:server_state")
        async def get(self) -> None:
            live = self.get_argument("live", "0") not in ("0", "false", "no")
            out = []
            for orm_spawner in self.db.query(orm.Spawner).filter(orm.Spawner.server != None):  # noqa: E711
                user = self.users[orm_spawner.user]
                spawner = user.spawners[orm_spawner.name]
                if hasattr(spawner, "board_status"):
                    out.append(await spawner.board_status(live=live))
            self.write(json.dumps(out))

    return [
        (r"/api/spinnaker/boards/?", AllBoardsHandler),
        (r"/api/spinnaker/boards/([^/]+)/?([^/]*)", ServerBoardsHandler),
    ]
