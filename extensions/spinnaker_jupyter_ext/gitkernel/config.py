"""The ``git_kernel`` settings as the set-up reads them: a view of the deployment config's validated section.

Every key, its default, its meaning and its rules are in the hub's schema (``hub/spinnaker_jupyter/schema.py``,
section ``git_kernel``); the hub validates the operator's config there and sends the whole section, defaults filled
in, to each user server as JSON in ``SPINNAKER_GIT_KERNEL_CONFIG`` (``hubconfig.user_server_env``), adding
``base_env`` (the deployment's pinned sPyNNaker environment) and ``slots_dir`` (its set-up slots). Nothing here
has defaults or rules of its own: this module only turns that JSON into typed values, so a missing key means a hub
and a server of different versions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spinnaker_server_contract import ServerContract

#: the git_kernel section as JSON, in the user's server environment (set by the hub)
CONFIG_ENV = ServerContract.variable("git_kernel")
#: the C build order file of support/automatic_make.sh (shipped in kernels/spynnaker-git/support/)
MAKE_ORDER_FILE = "make_order.txt"
#: what the hub adds to the section: facts of the deployment, not settings
FROM_THE_HUB = ("base_env", "slots_dir")


@dataclasses.dataclass(frozen=True)
class RepoSpec:
    """One repository: ``name`` is the directory under the set-up's folder and, unless ``url`` is given, the last
    part of its URL (``<base_url>/<name>``)."""

    name: str
    python: bool = True
    url: str | None = None
    branch: str | None = None

    def clone_url(self, base_url: str) -> str:
        return self.url or f"{base_url.rstrip('/')}/{self.name}"

    @classmethod
    def parse(cls, item: str | Mapping[str, Any]) -> RepoSpec:
        """A ``repos`` entry as the schema allows it: "Name", "Name:c" (C, cloned only), or a mapping."""
        if isinstance(item, str):
            name, _, kind = item.partition(":")
            return cls(name=name, python=kind != "c")
        return cls(
            name=str(item["name"]),
            python=bool(item.get("python", True)),
            url=item.get("url"),
            branch=item.get("branch"),
        )


@dataclasses.dataclass(frozen=True)
class MakeStep:
    directory: str
    install: bool = False

    @classmethod
    def parse(cls, item: str | Mapping[str, Any]) -> MakeStep:
        """A ``make_order`` entry as the schema allows it (and make_order.txt holds it): "DIR [install]", or
        a mapping {dir, install}."""
        if isinstance(item, str):
            directory, _, flag = item.strip().partition(" ")
            return cls(directory, flag.strip() == "install")
        return cls(str(item["dir"]), bool(item.get("install", False)))

    def line(self) -> str:
        return f"{self.directory} install" if self.install else self.directory


def read_make_order(path: Path) -> tuple[MakeStep, ...]:
    """The steps of a make_order.txt: one "DIRECTORY [install]" a line; blank lines and # comments skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return tuple(MakeStep.parse(line) for line in lines if line and not line.startswith("#"))


@dataclasses.dataclass(frozen=True)
class GitKernelConfig:
    """The validated ``git_kernel`` section (see the schema for what each key means)."""

    enabled: bool
    base_url: str
    branch: str
    repos: tuple[RepoSpec, ...]
    directory: str
    kernel_name: str
    display_name: str
    wheelhouse: str | None
    pip_cache_dir: str | None
    offline: bool
    clone_args: tuple[str, ...]
    extra_packages: tuple[str, ...]
    make_order: tuple[MakeStep, ...] | None  # None: the shipped support/make_order.txt
    build_c: str
    kernel_env: Mapping[str, str]
    launcher: str
    concurrency: int | None  # used by the hub, which makes the slots below
    #: prefix of the pinned sPyNNaker kernel env the venv is layered on (from the hub, not the schema)
    base_env: str | None = None
    #: the deployment's set-up slots, one file per set-up that may run at once (from the hub; slots.py)
    slots_dir: str | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> GitKernelConfig:
        """The view of a validated section (keys the schema does not know are not expected and not read)."""
        wanted = [f.name for f in dataclasses.fields(cls) if f.name not in FROM_THE_HUB]
        missing = [k for k in wanted if k not in section]
        if missing:
            raise ValueError(
                f"git_kernel: the section lacks {', '.join(missing)} (the hub sends every key of its "
                f"schema: is this server's spinnaker-jupyter-ext as new as the hub?)"
            )
        kw = {k: section[k] for k in wanted}
        kw.update(
            repos=tuple(RepoSpec.parse(r) for r in kw["repos"]),
            clone_args=tuple(map(str, kw["clone_args"])),
            extra_packages=tuple(map(str, kw["extra_packages"])),
            make_order=None if kw["make_order"] is None else tuple(map(MakeStep.parse, kw["make_order"])),
            kernel_env={str(k): str(v) for k, v in dict(kw["kernel_env"]).items()},
            base_env=section.get("base_env"),
            slots_dir=section.get("slots_dir"),
        )
        return cls(**kw)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GitKernelConfig | None:
        """The section the hub put in this server's environment; None where it sent none (git_kernel disabled)."""
        told = ServerContract.from_env(env)
        if told.problem("git_kernel"):
            raise ValueError(told.problem("git_kernel"))
        return None if told.git_kernel is None else cls.from_section(told.git_kernel)

    def to_section(self) -> dict[str, Any]:
        """Back to the section's JSON shape (``from_section(to_section())`` is the same config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(
            repos=[dataclasses.asdict(r) for r in self.repos],
            clone_args=list(self.clone_args),
            extra_packages=list(self.extra_packages),
            kernel_env=dict(self.kernel_env),
            make_order=None
            if self.make_order is None
            else [{"dir": s.directory, "install": s.install} for s in self.make_order],
        )
        return out

    @property
    def base_python(self) -> Path | None:
        return Path(self.base_env) / "bin" / "python" if self.base_env else None

    def replace(self, **changes: Any) -> GitKernelConfig:
        return dataclasses.replace(self, **changes)
