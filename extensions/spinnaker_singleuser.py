"""The command every user server runs, local or in a container: JupyterHub's `jupyterhub-singleuser`, without an
import that costs about 1.5 of a 3.4 CPU-second start and serves nobody here (benchmarks/README.md).

jsonschema (through jupyter_events, imported by jupyter_server) checks the "iri" string format with the optional
package rfc3987-syntax when it is installed; importing that package compiles an Earley grammar with lark. No event
schema of jupyter_server or its extensions uses that format. Marking the module absent (its import then raises
ImportError, which jsonschema expects of every optional format checker) leaves the format unchecked. Checked against
jsonschema 4.26.0, rfc3987-syntax 1.1.0.

A top-level module of the extension distribution, standard library only and importing nothing of Jupyter's, so that
the cut comes before jupyter_server is imported, and so that the single-user image (which has the extension, not
the hub package) runs it: its CMD is ``python3 -m spinnaker_singleuser jupyterhub-singleuser``. The hub's local
servers run it through ``spinnaker_jupyter.singleuser``, which adds a cut that matters only where Node is on the
PATH (the image has no Node).

Run as ``python -m spinnaker_singleuser jupyterhub-singleuser [its arguments]`` (a name on the PATH, or a path): the
upstream script runs as it is, in this process (`ps` / `pgrep -f jupyterhub-singleuser` still find it). The hub
(`spinnaker-jupyter up`) and the job service start through it too (``... jupyterhub -f ...``, ``... -m
spinnaker_jupyter.jobs.service``): they import jsonschema's formats as well, about 1 CPU-second each at every start.

In a container it first gives its uid a name (add_account_entry): the hub runs each user's container as that
user's own host account's uid and gid, which the image does not know.
"""

from __future__ import annotations

import os
import pwd
import re
import runpy
import shutil
import sys

#: Imported by jsonschema only if present; absent here on purpose (see the module's docstring).
SKIPPED_IMPORTS = ("rfc3987_syntax",)


def skip_imports() -> None:
    """Before anything imports jupyter_server."""
    for name in SKIPPED_IMPORTS:
        sys.modules.setdefault(name, None)  # (None: `import name` raises ImportError)


def add_account_entry(passwd: str = "/etc/passwd", group: str = "/etc/group") -> str | None:
    """A passwd (and group) entry for this process's uid and gid when they have none, so that `whoami`, the shell
    prompt and git know the name: ``$NB_USER`` (the host account's name, set by the hub) with home ``$HOME``; an
    entry podman made, named by the bare number, is replaced.
    The single-user image lets its group `users` (added to each container) write its own /etc/passwd and
    /etc/group, and has no setuid program to read them as root; elsewhere (local servers, an image run as its own
    user) every uid has an entry and nothing is written. Returns the name written, else None."""
    uid, gid = os.getuid(), os.getgid()
    try:
        if pwd.getpwuid(uid).pw_name != str(uid):  # (podman writes one named by the number: replaced)
            return None
    except KeyError:
        pass
    if uid == 0 or not os.access(passwd, os.W_OK):
        return None
    with open(passwd) as f:
        lines = [line for line in f if line.split(":")[:1] != [str(uid)]]
    names = {line.split(":", 1)[0] for line in lines}
    name = os.environ.get("NB_USER", "")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", name) or name in names:
        name = f"user{uid}"
    home = os.environ.get("HOME") or "/"
    lines.append(f"{name}:x:{uid}:{gid}:{name}:{home}:/bin/bash\n")
    with open(passwd, "w") as f:  # (in place: /etc is not writable, the file is)
        f.writelines(lines)
    if os.access(group, os.W_OK):
        with open(group) as f:
            gids = {line.split(":")[2] for line in f if line.count(":") >= 3}
        if str(gid) not in gids:
            with open(group, "a") as f:
                f.write(f"{name}:x:{gid}:\n")
    return name


def run(argv: list[str]) -> None:
    """Run the script ``argv[0]`` (found on the PATH when it is a bare name) with ``argv`` as its sys.argv, or the
    module ``argv[1]`` when ``argv[0]`` is ``-m`` (as ``python -m``)."""
    if argv[0] == "-m" and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]  # (runpy puts the module's file in sys.argv[0])
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = shutil.which(argv[0]) if "/" not in argv[0] else argv[0]
    if not script:
        sys.exit(f"spinnaker_singleuser: {argv[0]} is not on the PATH")
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m spinnaker_singleuser jupyterhub-singleuser [arguments]")
    add_account_entry()
    skip_imports()
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
