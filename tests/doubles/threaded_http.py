"""What the HTTP test doubles (spalloc_server.py, drive_server.py) share: a tornado server on an event loop of its
own in a daemon thread (start / stop / context manager, so a test keeps calling plain functions), and the request
plumbing of their API handlers (typed errors, JSON answers, the Authorization header)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, TypeVar

import tornado.httpserver
import tornado.netutil
import tornado.web

D = TypeVar("D", bound="ThreadedHTTPDouble")


class ThreadedHTTPDouble:
    """Base of a double served from a daemon thread. A subclass sets ``host``, ``port`` (0: any free port) and
    ``thread_name``, gives ``make_app()`` and ``serve()`` (which calls ``listen()``), and may extend ``shutdown()``."""

    thread_name = "http-double"
    host: str
    port: int
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: tornado.httpserver.HTTPServer | None = None

    def make_app(self) -> tornado.web.Application:
        raise NotImplementedError

    async def serve(self) -> None:
        """Start listening on the running event loop."""
        raise NotImplementedError

    def listen(self, **server_kwargs: Any) -> None:
        """Serve ``make_app()`` on the running loop; binds now, so ``port`` is known (filled in when it was 0)."""
        self._loop = asyncio.get_running_loop()
        sockets = tornado.netutil.bind_sockets(self.port, address=self.host)
        self.port = sockets[0].getsockname()[1]
        self._server = tornado.httpserver.HTTPServer(self.make_app(), **server_kwargs)
        self._server.add_sockets(sockets)

    async def shutdown(self) -> None:
        """Stop listening and close every connection (on the server's loop)."""
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()

    def start(self: D, timeout: float = 10.0) -> D:
        """Serve from a daemon thread; returns once listening (an error while binding is raised here)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.shutdown())
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{self.thread_name.replace('-', ' ')} did not start in time")
        if errors:
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self: D) -> D:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ApiHandler(tornado.web.RequestHandler):
    """An API handler of a double: no XSRF cookie check (a double checks what its real service checks itself), and
    an ``error_type`` exception raised by a handler becomes ``send_error(e.status)`` with the exception in
    ``exc_info`` for the subclass's ``write_error`` to render."""

    error_type: type[Exception] | None = None

    def check_xsrf_cookie(self) -> None:
        pass

    # tornado's private hook for exceptions raised by a handler (checked against tornado 6.6.1): the one place the
    # doubles use it
    def _handle_request_exception(self, e: BaseException) -> None:
        if self.error_type is not None and isinstance(e, self.error_type):
            self.send_error(e.status, exc_info=(type(e), e, e.__traceback__))  # type: ignore[attr-defined]
            return
        super()._handle_request_exception(e)

    def send_json(self, obj: Any, status: int = 200, content_type: str = "application/json") -> None:
        self.set_status(status)
        self.set_header("Content-Type", content_type)
        self.finish(json.dumps(obj))

    def authorization(self) -> tuple[str, str]:
        """``(scheme in lower case, credentials)`` of the Authorization header; ``("", "")`` without one."""
        scheme, sep, credentials = self.request.headers.get("Authorization", "").partition(" ")
        return (scheme.lower(), credentials.strip()) if sep else ("", "")
