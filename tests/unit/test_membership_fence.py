"""The JupyterHub 6.1.1 internals the collab membership check reaches for (upstream.users_with_servers,
upstream.stop_server): an upgrade that changes them fails here by name."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from unittest import mock

from jupyterhub.app import JupyterHub
from jupyterhub.handlers.base import BaseHandler
from jupyterhub.proxy import Proxy
from jupyterhub.user import User, UserDict

from spinnaker_jupyter import upstream


def test_the_app_is_the_authenticators_parent_and_holds_the_users():
    assert "parent=self" in inspect.getsource(JupyterHub._authenticator_default.func)
    trait = JupyterHub.class_traits()["users"]
    assert trait.klass is UserDict
    assert isinstance(inspect.getattr_static(User, "active"), property)


def test_stopping_a_server_is_what_the_rest_api_does():
    source = inspect.getsource(BaseHandler.stop_single_user)
    assert "await self.proxy.delete_user(user, server_name)" in source
    assert "await user.stop(server_name)" in source
    assert list(inspect.signature(User.stop).parameters) == ["self", "server_name"]
    assert list(inspect.signature(Proxy.delete_user).parameters) == ["self", "user", "server_name"]


def test_stop_server_takes_the_route_off_then_stops_and_leaves_pending_ones():
    calls = []

    async def record(*args):
        calls.append(args)

    spawner = SimpleNamespace(pending=None, active=True)
    user = SimpleNamespace(spawners={"": spawner}, stop=lambda name: record("stop", name))
    proxy = SimpleNamespace(delete_user=lambda u, name: record("route", name))
    auth = SimpleNamespace(parent=SimpleNamespace(proxy=proxy, users={"u": user}))
    user.active = True
    assert upstream.users_with_servers(auth) == [user]
    asyncio.run(upstream.stop_server(auth, user, ""))
    assert calls == [("route", ""), ("stop", "")]
    spawner.pending = "spawn"
    asyncio.run(upstream.stop_server(auth, user, ""))
    assert len(calls) == 2
    assert upstream.users_with_servers(SimpleNamespace(parent=mock.Mock(spec=[]))) == []
