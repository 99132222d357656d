#!/usr/bin/env python3
"""A test double of EBRAINS Drive: the Seahub (Seafile) web API subset that ebrains-drive 0.7.0 and rclone 1.60's
Seafile backend use, plus EBRAINS' token exchange.

Endpoints (``{repo}`` is a library id; ``?p=`` paths are absolute inside the library):

* ``GET  api2/server-info/`` (no auth): ``{"version": "9.0.5", "features": [...]}`` (rclone checks it is semver).
* ``GET  api2/account/token/`` with ``Authorization: Bearer <OIDC access token>``: EBRAINS' patch of Seahub. The
  token is checked at the OIDC provider's userinfo endpoint (tests/oidc); a valid one gets a Seafile token (plain
  text), anything else 401. The user's collab teams (``roles.team``, ``collab-<name>-<role>``) are taken from there.
* Everything else needs ``Authorization: Token <seafile token>`` (401 otherwise):
  ``GET api2/auth/ping/`` (``"pong"``), ``GET api2/account/info/``, ``GET api2/default-repo/``;
  ``GET|POST api2/repos/`` (list / create), ``GET|DELETE api2/repos/{repo}/``;
  ``GET|POST|DELETE api2/repos/{repo}/dir/`` (listing with the ``oid`` header / ``operation=mkdir|rename`` / delete),
  ``GET api/v2.1/repos/{repo}/dir/`` (``dirent_list``), ``GET api/v2.1/repos/{repo}/dir/detail/?path=``;
  ``GET api2/repos/{repo}/file/detail/``; ``GET api2/repos/{repo}/file/`` (a JSON-quoted single-use download
  link); ``POST api2/repos/{repo}/file/`` (``operation=create|rename``, form); ``DELETE api2/repos/{repo}/file/``;
  ``POST api/v2.1/repos/{repo}/file/`` (JSON ``operation=move|copy|rename``);
  ``POST api/v2.1/repos/sync-batch-move-item/`` and ``POST api/v2.1/copy-move-task/`` (move / copy);
  ``GET api2/repos/{repo}/upload-link/`` (a JSON-quoted single-use upload link).
* ``GET seafhttp/files/{token}/{name}`` (Range requests too) and ``POST seafhttp/upload-api/{token}``: multipart
  (``file``, ``parent_dir``, ``relative_path``, ``replace``), plain or ``Transfer-Encoding: chunked``; with
  ``?ret-json=1`` the answer is ``[{"name", "id", "size"}]``, else the new file's id.

Libraries: each user has ``My Library`` (listed with ``type: repo``); :meth:`DriveDouble.add_library` with
``collab=NAME`` makes a collab's library, shared with every user whose ``roles.team`` names that collab
(``type: grepo``, ``owner: collab-NAME-administrator`` as EBRAINS shows it; viewers read only).

Switches for tests: :meth:`DriveDouble.revoke_tokens` (Seafile tokens answer 401 until exchanged again),
``double.down = True`` (every request answers 502, as a proxy in front of a dead Seahub), ``double.status_override``
(a status for every authenticated request). ``double.requests`` records ``(method, path)`` of every request.
Deliberate limits: no encrypted libraries, no history, no share links, no quotas, no chunked (resumable) uploads.

Run it: ``python tests/doubles/drive_server.py --userinfo-url URL [--port P]``; import it:
``with DriveDouble(userinfo_url=...) as drive: drive.url``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import posixpath
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import tornado.httpclient
import tornado.httputil
import tornado.web

try:
    from .threaded_http import ApiHandler, ThreadedHTTPDouble
except ImportError:  # run as a script: python tests/doubles/drive_server.py
    from threaded_http import ApiHandler, ThreadedHTTPDouble

log = logging.getLogger("drive-double")

ZERO_ID = "0" * 40
SERVER_VERSION = "9.0.5"
MY_LIBRARY = "My Library"


@dataclass
class File:
    data: bytes = b""
    mtime: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return hashlib.sha1(self.data).hexdigest() if self.data else ZERO_ID


@dataclass
class Dir:
    entries: dict[str, Dir | File] = field(default_factory=dict)
    mtime: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        if not self.entries:
            return ZERO_ID
        h = hashlib.sha1()
        for name in sorted(self.entries):
            h.update(f"{name}\0{self.entries[name].id}\0".encode())
        return h.hexdigest()


@dataclass
class Library:
    id: str
    name: str
    owner: str  # a user name, or "collab-<name>-administrator"
    collab: str | None = None
    root: Dir = field(default_factory=Dir)
    mtime: float = field(default_factory=time.time)

    def size(self) -> int:
        def walk(d: Dir) -> int:
            return sum(walk(e) if isinstance(e, Dir) else len(e.data) for e in d.entries.values())

        return walk(self.root)


class DriveError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _split(path: str) -> list[str]:
    norm = posixpath.normpath("/" + (path or "/"))
    return [p for p in norm.split("/") if p]


class DriveDouble(ThreadedHTTPDouble):
    """The Drive double. ``start()`` serves it from a background thread; use as a context manager."""

    thread_name = "drive-double"

    def __init__(self, *, userinfo_url: str, host: str = "127.0.0.1", port: int = 0, userinfo_timeout: float = 10.0):
        self.userinfo_url = userinfo_url
        self.host = host
        self.port = port
        self.userinfo_timeout = userinfo_timeout
        self.libraries: dict[str, Library] = {}
        self.tokens: dict[str, str] = {}  # seafile token -> user name
        self.teams: dict[str, set[str]] = {}  # user name -> collab names (from roles.team)
        self.write_teams: dict[str, set[str]] = {}  # user name -> collabs with editor/administrator role
        self.links: dict[str, tuple[str, str, str]] = {}  # token -> (kind, repo id, path)
        self.down = False
        self.status_override: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.exchanges = 0
        self.exchanged: list[tuple[str, str]] = []  # (user, OIDC access token) of each successful exchange
        self.lock = threading.RLock()

    # -- test API -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The Drive URL as clients take it (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def my_library(self, user: str) -> Library:
        with self.lock:
            for lib in self.libraries.values():
                if lib.owner == user and lib.name == MY_LIBRARY and lib.collab is None:
                    return lib
            return self._new_library(MY_LIBRARY, user)

    def add_library(
        self, name: str, *, owner: str | None = None, collab: str | None = None, files: dict[str, bytes] | None = None
    ) -> Library:
        """A library owned by ``owner``, or a collab's (shared with the collab's members)."""
        if (owner is None) == (collab is None):
            raise ValueError("give exactly one of owner= and collab=")
        with self.lock:
            lib = self._new_library(name, owner or f"collab-{collab}-administrator", collab)
            for path, data in (files or {}).items():
                self.write(lib, path, data)
            return lib

    def _new_library(self, name: str, owner: str, collab: str | None = None) -> Library:
        lib = Library(id=str(uuid.uuid4()), name=name, owner=owner, collab=collab)
        self.libraries[lib.id] = lib
        return lib

    def write(self, lib: Library, path: str, data: bytes) -> None:
        """Put a file (making its folders) as if uploaded through the web page."""
        with self.lock:
            *dirs, name = _split(path)
            d = lib.root
            for part in dirs:
                d = d.entries.setdefault(part, Dir())  # type: ignore[assignment]
            d.entries[name] = File(data)
            lib.mtime = time.time()

    def read(self, lib: Library, path: str) -> bytes | None:
        """A file's content, or None."""
        with self.lock:
            try:
                node = self._node(lib, path)
            except DriveError:
                return None
            return node.data if isinstance(node, File) else None

    def listdir(self, lib: Library, path: str = "/") -> list[str]:
        with self.lock:
            node = self._node(lib, path)
            return sorted(node.entries) if isinstance(node, Dir) else []

    def revoke_tokens(self, user: str | None = None) -> int:
        """Forget the Seafile tokens (of one user, or everyone's): their next requests answer 401."""
        with self.lock:
            gone = [t for t, u in self.tokens.items() if user is None or u == user]
            for t in gone:
                del self.tokens[t]
            return len(gone)

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    # -- model --------------------------------------------------------------------------------------------------
    def visible(self, user: str) -> list[tuple[Library, str]]:
        """Libraries ``user`` sees, with the listing ``type`` (repo / grepo)."""
        self.my_library(user)
        out = []
        for lib in self.libraries.values():
            if lib.collab is None and lib.owner == user:
                out.append((lib, "repo"))
            elif lib.collab is not None and lib.collab in self.teams.get(user, set()):
                out.append((lib, "grepo"))
        return out

    def library_for(self, user: str, repo_id: str, write: bool = False) -> Library:
        for lib, _kind in self.visible(user):
            if lib.id == repo_id:
                if write and not self.can_write(user, lib):
                    raise DriveError(403, "You do not have permission to perform this action.")
                return lib
        raise DriveError(404, "Library not found.")

    def can_write(self, user: str, lib: Library) -> bool:
        return lib.collab is None or lib.collab in self.write_teams.get(user, set())

    def _node(self, lib: Library, path: str) -> Dir | File:
        node: Dir | File = lib.root
        for part in _split(path):
            if not isinstance(node, Dir) or part not in node.entries:
                raise DriveError(404, f"{path} not found.")
            node = node.entries[part]
        return node

    def _dir(self, lib: Library, path: str) -> Dir:
        node = self._node(lib, path)
        if not isinstance(node, Dir):
            raise DriveError(404, f"Folder {path} not found.")
        return node

    def _file(self, lib: Library, path: str) -> File:
        node = self._node(lib, path)
        if not isinstance(node, File):
            raise DriveError(404, f"File {path} not found.")
        return node

    def _parent(self, lib: Library, path: str) -> tuple[Dir, str]:
        parts = _split(path)
        if not parts:
            raise DriveError(400, "path invalid.")
        return self._dir(lib, "/" + "/".join(parts[:-1])), parts[-1]

    def _detach(self, lib: Library, path: str) -> Dir | File:
        parent, name = self._parent(lib, path)
        if name not in parent.entries:
            raise DriveError(404, f"{path} not found.")
        parent.mtime = lib.mtime = time.time()
        return parent.entries.pop(name)

    def _attach(self, lib: Library, dir_path: str, name: str, node: Dir | File, replace: bool = True) -> str:
        parent = self._dir(lib, dir_path)
        if name in parent.entries and not replace:
            stem, ext = posixpath.splitext(name)
            n = 1
            while f"{stem} ({n}){ext}" in parent.entries:
                n += 1
            name = f"{stem} ({n}){ext}"
        parent.entries[name] = node
        parent.mtime = lib.mtime = time.time()
        return name

    def make_link(self, kind: str, lib: Library, path: str) -> str:
        token = secrets.token_urlsafe(18)
        self.links[token] = (kind, lib.id, path)
        if kind == "download":
            return f"{self.url}/seafhttp/files/{token}/{quote(posixpath.basename(path))}"
        return f"{self.url}/seafhttp/upload-api/{token}"

    # -- serving ------------------------------------------------------------------------------------------------
    def make_app(self) -> tornado.web.Application:
        kw = {"double": self}
        repo = r"([0-9a-f-]{36})"
        return tornado.web.Application(
            [
                (r"/api2/server-info/?", ServerInfoHandler, kw),
                (r"/api2/account/token/?", TokenExchangeHandler, kw),
                (r"/api2/auth/ping/?", PingHandler, kw),
                (r"/api2/account/info/?", AccountInfoHandler, kw),
                (r"/api2/default-repo/?", DefaultRepoHandler, kw),
                (r"/api2/repos/?", ReposHandler, kw),
                (rf"/api2/repos/{repo}/?", RepoHandler, kw),
                (rf"/api2/repos/{repo}/dir/?", DirV2Handler, kw),
                (rf"/api/v2\.1/repos/{repo}/dir/?", DirV21Handler, kw),
                (rf"/api/v2\.1/repos/{repo}/dir/detail/?", DirDetailHandler, kw),
                (rf"/api2/repos/{repo}/file/detail/?", FileDetailHandler, kw),
                (rf"/api2/repos/{repo}/file/?", FileV2Handler, kw),
                (rf"/api/v2\.1/repos/{repo}/file/?", FileV21Handler, kw),
                (r"/api/v2\.1/repos/sync-batch-(move|copy)-item/?", BatchHandler, kw),
                (r"/api/v2\.1/copy-move-task/?", CopyMoveTaskHandler, kw),
                (rf"/api2/repos/{repo}/upload-link/?", UploadLinkHandler, kw),
                (r"/seafhttp/files/([^/]+)/.*", DownloadHandler, kw),
                (r"/seafhttp/upload-api/([^/]+)", UploadHandler, kw),
                (r".*", NotFoundHandler, kw),
            ],
            xsrf_cookies=False,
            compress_response=False,
        )

    async def serve(self) -> None:
        self.listen(idle_connection_timeout=60, max_body_size=512 * 1024 * 1024)
        log.info("drive double serving %s", self.url)


# ---------------------------------------------------------------------------------------------------------------
# handlers


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


class BaseHandler(ApiHandler):
    auth_required = True
    error_type = DriveError

    def initialize(self, double: DriveDouble) -> None:
        self.double = double
        self.user: str | None = None

    def prepare(self) -> None:
        d = self.double
        with d.lock:
            d.requests.append((self.request.method, self.request.path))
        if d.down:
            self.set_status(502)
            self.finish("<html><body><h1>502 Bad Gateway</h1></body></html>")
            return
        if not self.auth_required:
            return
        scheme, token = self.authorization()
        with d.lock:
            user = d.tokens.get(token) if scheme == "token" else None
        if user is None:
            self.set_status(401)
            self.set_header("WWW-Authenticate", "Token")
            self.finish({"detail": "Invalid token"})
            return
        if d.status_override:
            self.set_status(d.status_override)
            self.finish({"error_msg": "status forced by the test"})
            return
        self.user = user

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = exc.message if isinstance(exc, DriveError) else self._reason
        self.finish({"error_msg": message})

    def p(self, name: str = "p") -> str:
        value = self.get_query_argument(name, None)
        if value is None:
            raise DriveError(400, f"{name} invalid.")
        return "/" + "/".join(_split(value))

    def json_body(self) -> dict:
        ctype = self.request.headers.get("Content-Type", "")
        if "json" in ctype:
            try:
                return json.loads(self.request.body or b"{}")
            except ValueError:
                raise DriveError(400, "invalid JSON") from None
        return {k: self.get_body_argument(k) for k in self.request.body_arguments}

    def reload_dir(self, lib: Library, path: str) -> bool:
        """``?reloaddir=true`` (ebrains-drive): answer 200 with the parent folder's listing, as Seahub does."""
        if self.get_query_argument("reloaddir", "").lower() != "true":
            return False
        d = self.double
        perm = "rw" if d.can_write(self.user, lib) else "r"
        node = d._dir(lib, path)
        self.send_json([_dirent(n, e, path, lib, perm) for n, e in sorted(node.entries.items())])
        return True

    def quoted(self, text: str) -> None:
        self.send_json(text, content_type="application/json; charset=utf-8")


class NotFoundHandler(BaseHandler):
    auth_required = False

    def prepare(self) -> None:
        super().prepare()
        if not self._finished:
            raise tornado.web.HTTPError(404)


class ServerInfoHandler(BaseHandler):
    auth_required = False

    def get(self) -> None:
        self.finish(
            {
                "version": SERVER_VERSION,
                "encrypted_library_version": 2,
                "features": ["seafile-basic", "seafile-pro", "office-preview", "file-search"],
            }
        )


class TokenExchangeHandler(BaseHandler):
    """EBRAINS' ``api2/account/token/``: an OIDC access token (checked at the provider) for a Seafile token."""

    auth_required = False

    async def get(self) -> None:
        d = self.double
        scheme, oidc_token = self.authorization()
        if scheme != "bearer" or not oidc_token:
            raise DriveError(401, "Bearer token required.")
        client = tornado.httpclient.AsyncHTTPClient()
        try:
            resp = await client.fetch(
                d.userinfo_url,
                headers={"Authorization": f"Bearer {oidc_token}"},
                raise_error=False,
                request_timeout=d.userinfo_timeout,
            )
        except OSError as e:
            raise DriveError(502, f"identity provider unreachable: {e}") from None
        if resp.code != 200:
            raise DriveError(401, "Invalid token.")
        info = json.loads(resp.body)
        user = info.get("preferred_username") or info["sub"]
        teams = (info.get("roles") or {}).get("team") or []
        collabs, writable = set(), set()
        for team in teams:
            m = re.fullmatch(r"collab-(.+)-(viewer|editor|administrator)", team)
            if m:
                collabs.add(m.group(1))
                if m.group(2) != "viewer":
                    writable.add(m.group(1))
        token = secrets.token_hex(20)
        with d.lock:
            d.teams[user], d.write_teams[user] = collabs, writable
            d.tokens[token] = user
            d.exchanges += 1
            d.exchanged.append((user, oidc_token))
            d.my_library(user)
        self.set_header("Content-Type", "text/plain")
        self.finish(token)


class PingHandler(BaseHandler):
    def get(self) -> None:
        self.quoted("pong")


class AccountInfoHandler(BaseHandler):
    def get(self) -> None:
        with self.double.lock:
            usage = sum(lib.size() for lib, kind in self.double.visible(self.user) if kind == "repo")
        self.finish(
            {
                "usage": usage,
                "total": -2,
                "email": f"{self.user}@ebrains.test",
                "name": self.user,
                "login_id": self.user,
            }
        )


def _repo_json(d: DriveDouble, lib: Library, kind: str, user: str) -> dict:
    return {
        "id": lib.id,
        "name": lib.name,
        "owner": lib.owner,
        "owner_name": lib.owner,
        "type": kind,
        "permission": "rw" if d.can_write(user, lib) else "r",
        "encrypted": False,
        "size": lib.size(),
        "mtime": int(lib.mtime),
        "root": lib.root.id,
        "virtual": False,
        "version": 1,
        "head_commit_id": lib.root.id,
        **({"groupid": 1, "group_name": lib.collab} if lib.collab else {}),
    }


class DefaultRepoHandler(BaseHandler):
    def get(self) -> None:
        with self.double.lock:
            self.finish({"exists": True, "repo_id": self.double.my_library(self.user).id})


class ReposHandler(BaseHandler):
    def get(self) -> None:
        d = self.double
        with d.lock:
            repos = [_repo_json(d, lib, kind, self.user) for lib, kind in d.visible(self.user)]
        self.send_json(repos)

    def post(self) -> None:
        body = self.json_body()
        name = body.get("name") or body.get("repo_name")
        if not name:
            raise DriveError(400, "name invalid.")
        with self.double.lock:
            lib = self.double._new_library(name, self.user)
        self.finish({"repo_id": lib.id, "repo_name": lib.name, "id": lib.id, "name": lib.name})


class RepoHandler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            for lib, kind in d.visible(self.user):
                if lib.id == repo_id:
                    self.finish(_repo_json(d, lib, kind, self.user))
                    return
        raise DriveError(404, "Library not found.")

    def delete(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            if lib.owner != self.user:
                raise DriveError(403, "Permission denied.")
            del d.libraries[lib.id]
        self.quoted("success")


def _dirent(name: str, node: Dir | File, parent: str, lib: Library, perm: str) -> dict:
    entry = {"id": node.id, "name": name, "mtime": int(node.mtime), "permission": perm, "parent_dir": parent}
    if isinstance(node, File):
        entry.update(type="file", size=len(node.data))
    else:
        entry.update(type="dir", size=0)
    return entry


class DirV2Handler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            path = self.p()
            node = d._dir(lib, path)
            perm = "rw" if d.can_write(self.user, lib) else "r"
            entries = [_dirent(n, e, path, lib, perm) for n, e in sorted(node.entries.items())]
            # Seahub lists folders first
            entries.sort(key=lambda e: e["type"] != "dir")
            self.set_header("oid", node.id)
            self.set_header("dir_perm", perm)
        self.send_json(entries)

    def post(self, repo_id: str) -> None:
        d = self.double
        body = self.json_body()
        op = body.get("operation")
        with d.lock:
            lib = d.library_for(self.user, repo_id, write=True)
            path = self.p()
            if op == "mkdir":
                parent, name = d._parent(lib, path)
                if name in parent.entries:
                    if isinstance(parent.entries[name], Dir):
                        node = parent.entries[name]
                    else:
                        raise DriveError(409, "A file of that name exists.")
                else:
                    node = Dir()
                    d._attach(lib, posixpath.dirname(path), name, node)
                self.set_header("oid", node.id)
                if not self.reload_dir(lib, posixpath.dirname(path)):
                    self.set_status(201)
                    self.set_header("Location", f"{d.url}/api2/repos/{lib.id}/dir/?p={quote(path)}")
                    self.quoted("success")
            elif op == "rename":
                newname = body.get("newname") or ""
                if not newname or "/" in newname:
                    raise DriveError(400, "newname invalid.")
                d._dir(lib, path)
                node = d._detach(lib, path)
                d._attach(lib, posixpath.dirname(path), newname, node)
                self.set_header("oid", node.id)
                if not self.reload_dir(lib, posixpath.dirname(path)):
                    self.quoted("success")
            else:
                raise DriveError(400, "operation invalid.")

    def delete(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id, write=True)
            path = self.p()
            if path == "/":
                raise DriveError(400, "Can not delete the root folder.")
            d._dir(lib, path)
            d._detach(lib, path)
        self.quoted("success")


class DirV21Handler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        recursive = self.get_query_argument("recursive", "0") == "1"
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            path = self.p()
            top = d._dir(lib, path)
            perm = "rw" if d.can_write(self.user, lib) else "r"
            entries: list[dict] = []

            def walk(node: Dir, at: str) -> None:
                for name, e in sorted(node.entries.items()):
                    entries.append(_dirent(name, e, at, lib, perm))
                    if recursive and isinstance(e, Dir):
                        walk(e, posixpath.join(at, name))

            walk(top, path)
        self.finish({"user_perm": perm, "dir_id": top.id, "dirent_list": entries})


class DirDetailHandler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            path = self.p("path")
            node = d._dir(lib, path)
        self.finish(
            {
                "repo_id": lib.id,
                "path": path,
                "name": posixpath.basename(path) or lib.name,
                "mtime": _iso(node.mtime),
                "permission": "rw" if d.can_write(self.user, lib) else "r",
            }
        )


def _file_json(name: str, node: File, parent: str) -> dict:
    return {
        "id": node.id,
        "type": "file",
        "name": name,
        "size": len(node.data),
        "parent_dir": parent,
        "mtime": int(node.mtime),
        "last_modified": _iso(node.mtime),
    }


class FileDetailHandler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            path = self.p()
            node = d._file(lib, path)
            self.finish(_file_json(posixpath.basename(path), node, posixpath.dirname(path)))


class FileV2Handler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id)
            path = self.p()
            d._file(lib, path)
            link = d.make_link("download", lib, path)
        self.quoted(link)

    def post(self, repo_id: str) -> None:
        d = self.double
        body = self.json_body()
        op = body.get("operation")
        with d.lock:
            lib = d.library_for(self.user, repo_id, write=True)
            path = self.p()
            if op == "create":
                parent, name = d._parent(lib, path)
                if name in parent.entries:
                    raise DriveError(409, "A file of that name exists.")
                node = File()
                d._attach(lib, posixpath.dirname(path), name, node)
                self.set_header("oid", node.id)
                if not self.reload_dir(lib, posixpath.dirname(path)):
                    self.set_status(201)
                    self.quoted("success")
            elif op == "rename":
                newname = body.get("newname") or ""
                if not newname or "/" in newname:
                    raise DriveError(400, "newname invalid.")
                d._file(lib, path)
                node = d._detach(lib, path)
                d._attach(lib, posixpath.dirname(path), newname, node)
                self.set_header("oid", node.id)
                if not self.reload_dir(lib, posixpath.dirname(path)):
                    self.set_status(301)
                    self.set_header(
                        "Location",
                        f"{d.url}/api2/repos/{lib.id}/file/?p={quote(posixpath.join(posixpath.dirname(path), newname))}",
                    )
                    self.quoted("success")
            else:
                raise DriveError(400, "operation invalid.")

    def delete(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id, write=True)
            path = self.p()
            d._file(lib, path)
            d._detach(lib, path)
        self.quoted("success")


class FileV21Handler(BaseHandler):
    """rclone's file move / copy / rename (JSON)."""

    def post(self, repo_id: str) -> None:
        d = self.double
        body = self.json_body()
        op = body.get("operation")
        with d.lock:
            src = d.library_for(self.user, repo_id, write=op != "copy")
            path = self.p()
            node = d._file(src, path)
            if op == "rename":
                newname = body.get("newname") or ""
                if not newname or "/" in newname:
                    raise DriveError(400, "newname invalid.")
                d._detach(src, path)
                name = d._attach(src, posixpath.dirname(path), newname, node)
                dst, dst_dir = src, posixpath.dirname(path)
            elif op in ("move", "copy"):
                dst = d.library_for(self.user, body.get("dst_repo") or "", write=True)
                dst_dir = "/" + "/".join(_split(body.get("dst_dir") or "/"))
                if op == "move":
                    d._detach(src, path)
                else:
                    node = File(node.data, node.mtime)
                name = d._attach(dst, dst_dir, posixpath.basename(path), node)
            else:
                raise DriveError(400, "operation invalid.")
        self.finish(
            {
                "type": "file",
                "repo_id": dst.id,
                "parent_dir": dst_dir,
                "obj_name": name,
                "obj_id": node.id,
                "size": len(node.data),
                "mtime": _iso(node.mtime),
            }
        )


def _move_items(
    d: DriveDouble, user: str, op: str, src_id: str, src_dir: str, names: list[str], dst_id: str, dst_dir: str
) -> None:
    src = d.library_for(user, src_id, write=op == "move")
    dst = d.library_for(user, dst_id, write=True)
    d._dir(dst, dst_dir)
    for name in names:
        path = posixpath.join("/" + "/".join(_split(src_dir)), name)
        node = d._node(src, path)
        if op == "move":
            d._detach(src, path)
        else:
            node = _deep_copy(node)
        d._attach(dst, "/" + "/".join(_split(dst_dir)), name, node)


def _deep_copy(node: Dir | File) -> Dir | File:
    if isinstance(node, File):
        return File(node.data, node.mtime)
    return Dir({n: _deep_copy(e) for n, e in node.entries.items()}, node.mtime)


class BatchHandler(BaseHandler):
    """rclone's folder move (``sync-batch-move-item``), JSON."""

    def post(self, op: str) -> None:
        body = self.json_body()
        with self.double.lock:
            _move_items(
                self.double,
                self.user,
                op,
                body.get("src_repo_id") or "",
                body.get("src_parent_dir") or "/",
                list(body.get("src_dirents") or []),
                body.get("dst_repo_id") or "",
                body.get("dst_parent_dir") or "/",
            )
        self.finish({"success": True})


class CopyMoveTaskHandler(BaseHandler):
    """ebrains-drive's ``moveTo`` / ``copyTo`` (form fields), done at once (the real one may queue a task)."""

    def post(self) -> None:
        body = self.json_body()
        op = body.get("operation")
        if op not in ("move", "copy"):
            raise DriveError(400, "operation invalid.")
        with self.double.lock:
            _move_items(
                self.double,
                self.user,
                op,
                body.get("src_repo_id") or "",
                body.get("src_parent_dir") or "/",
                [body.get("src_dirent_name") or ""],
                body.get("dst_repo_id") or "",
                body.get("dst_parent_dir") or "/",
            )
        self.finish({"task_id": ""})


class UploadLinkHandler(BaseHandler):
    def get(self, repo_id: str) -> None:
        d = self.double
        with d.lock:
            lib = d.library_for(self.user, repo_id, write=True)
            path = "/" + "/".join(_split(self.get_query_argument("p", "/")))
            d._dir(lib, path)
            link = d.make_link("upload", lib, path)
        self.quoted(link)


class DownloadHandler(BaseHandler):
    """A single-use download link: the first GET consumes it (also a range GET)."""

    auth_required = False

    def get(self, token: str) -> None:
        d = self.double
        with d.lock:
            kind, repo_id, path = d.links.pop(token, (None, "", ""))
            lib = d.libraries.get(repo_id)
            if kind != "download" or lib is None:
                raise DriveError(404, "Link expired or unknown.")
            data = d._file(lib, path).data
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Accept-Ranges", "bytes")
        rng = self.request.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                else:
                    start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
                end = min(end, len(data) - 1)
                if start >= len(data) and len(data) > 0:
                    self.set_status(416)
                    self.set_header("Content-Range", f"bytes */{len(data)}")
                    self.finish()
                    return
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.finish(data[start : end + 1])
                return
        self.finish(data)


class UploadHandler(BaseHandler):
    """A single-use upload link: multipart ``file`` + ``parent_dir`` (+ ``relative_path``, ``replace``)."""

    auth_required = False

    def post(self, token: str) -> None:
        d = self.double
        with d.lock:
            kind, repo_id, link_dir = d.links.pop(token, (None, "", ""))
            lib = d.libraries.get(repo_id)
        if kind != "upload" or lib is None:
            raise DriveError(403, "Access denied: the upload link expired or is unknown.")
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[tornado.httputil.HTTPFile]] = {}
        tornado.httputil.parse_body_arguments(
            self.request.headers.get("Content-Type", ""), self.request.body, args, files, self.request.headers
        )
        if not files.get("file"):
            raise DriveError(400, "No file.")

        def arg(name: str, default: str = "") -> str:
            return args[name][0].decode() if args.get(name) else default

        parent = "/" + "/".join(_split(arg("parent_dir", link_dir)))
        relative = "/".join(_split(arg("relative_path", "")))
        target = posixpath.join(parent, relative) if relative else parent
        replace = arg("replace", "0") == "1"
        results = []
        with d.lock:
            # uploads make the folders of relative_path, as Seafile does
            node: Dir | File = d._dir(lib, parent)
            for part in _split(relative):
                assert isinstance(node, Dir)
                nxt = node.entries.get(part)
                if nxt is None:
                    nxt = node.entries[part] = Dir()
                if not isinstance(nxt, Dir):
                    raise DriveError(409, f"{part} is a file.")
                node = nxt
            for upload in files["file"]:
                name = posixpath.basename(upload.filename or "")
                if not name:
                    raise DriveError(400, "file name invalid.")
                new = File(bytes(upload.body))
                name = d._attach(lib, target, name, new, replace=replace)
                results.append({"name": name, "id": new.id, "size": len(new.data)})
        if self.get_query_argument("ret-json", "") == "1":
            self.send_json(results)
        else:
            self.set_header("Content-Type", "text/plain")
            self.finish(results[-1]["id"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Test double of EBRAINS Drive (Seahub web API subset).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--userinfo-url", required=True, help="the OIDC provider's userinfo endpoint")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    double = DriveDouble(userinfo_url=args.userinfo_url, host=args.host, port=args.port).start()
    print(double.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        double.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
