#!/usr/bin/env python3
"""Build the project's container images through the Docker API (Docker Engine, or podman's compatible service).

    python images/build.py [options] [singleuser|hub|drive|nrp|all ...]

Examples:
    python images/build.py --podman singleuser         # here: the project's podman (started if needed), the
                                                         # debootstrap base, network host
    python images/build.py --engine-socket unix:///var/run/docker.sock all --nrp-image IMAGE   # production

Every build step is printed with the elapsed time; at the end each image's layers are listed with their size and
the time their step took. The build context is the repository root, filtered by `<Containerfile>.dockerignore`.
Layers are cached by the engine: an unchanged rebuild takes seconds.

Images (TAG default `latest`, PREFIX default `spinnaker-jupyter`):
    PREFIX/singleuser:TAG   images/singleuser/Containerfile
    PREFIX/hub:TAG          images/hub/Containerfile
    PREFIX/drive:TAG        images/drive/Containerfile (the EBRAINS Drive helper, spawner.docker.drive_image)
    PREFIX/nrp:TAG          images/singleuser/Containerfile on top of --nrp-image, then images/nrp/Containerfile
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "podman"))
sys.path.insert(0, str(REPO / "hub"))  # the hub package's pip_config (standard library only), uninstalled too

import podman_env  # noqa: E402

from spinnaker_jupyter import pip_config  # noqa: E402

TARGETS = ("singleuser", "hub", "drive", "nrp")
CONTAINERFILES = {
    "singleuser": "images/singleuser/Containerfile",
    "hub": "images/hub/Containerfile",
    "drive": "images/drive/Containerfile",
    "nrp": "images/nrp/Containerfile",
}
MILESTONE = re.compile(
    r"^(Collecting |Successfully installed|\d+ upgraded, \d+ newly installed|Fetched |Building wheel|"
    r"Successfully built|Created wheel|added \d+ packages|Python \d|arm-none-eabi-gcc|"
    r"Available kernels|\s+spynnaker\s|\s+spinnaker_jupyter_ext)"
)
STEP = re.compile(
    r"^(?:\[(?P<stage>\d+)/(?P<stages>\d+)\] )?STEP (?P<n>\d+)/(?P<m>\d+): (?P<text>.*)$"
    r"|^Step (?P<dn>\d+)/(?P<dm>\d+) : (?P<dtext>.*)$"
)


class BuildError(RuntimeError):
    pass


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pip_cert() -> str | None:
    """The CA bundle pip is configured with on this machine (pip's own view: its config files and $PIP_CERT)."""
    return pip_config.cert()


def make_context(containerfile: str, ca_bundle: str | None, root: Path = REPO) -> tempfile.SpooledTemporaryFile:
    """The build context: the repository root filtered by the Containerfile's .dockerignore, plus the CA bundle."""
    from docker.utils.build import exclude_paths

    ignore = root / (containerfile + ".dockerignore")
    patterns = (
        [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if ignore.exists()
        else []
    )
    if "*" in patterns and not (root / containerfile).exists():
        raise BuildError(f"{containerfile} not found under {root}")
    files = sorted(exclude_paths(str(root), patterns, dockerfile=containerfile))
    buf = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in files:
            full = root / rel
            info = tar.gettarinfo(str(full), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0  # the engines' cache keys hash content, not times; keep the tar reproducible anyway
            if info.isfile():
                with open(full, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
        if ca_bundle:
            data = Path(ca_bundle).read_bytes()
            info = tarfile.TarInfo("images/build-ca/ca-bundle.crt")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    size = buf.tell()
    buf.seek(0)
    buf.size_bytes = size  # type: ignore[attr-defined]
    buf.file_count = len(files)  # type: ignore[attr-defined]
    return buf


@dataclass
class Step:
    label: str
    started: float
    seconds: float = 0.0
    cached: bool = False
    layer: str = ""


@dataclass
class Result:
    image: str
    seconds: float
    steps: list[Step] = field(default_factory=list)
    image_id: str = ""


def build(
    api,
    target_tag: str,
    containerfile: str,
    buildargs: dict,
    *,
    ca_bundle: str | None,
    network_mode: str | None,
    nocache: bool = False,
    verbose: bool = False,
    target: str | None = None,
    labels: dict | None = None,
) -> Result:
    t0 = time.monotonic()
    ctx = make_context(containerfile, ca_bundle)
    say(
        f"==> {target_tag}: context {ctx.file_count} files, {ctx.size_bytes / 1e6:.1f} MB "
        f"({containerfile}{', build CA ' + ca_bundle if ca_bundle else ''})"
    )
    shown = {k: v for k, v in buildargs.items()}
    if shown:
        say("    build args: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    result = Result(target_tag, 0.0)
    tail: list[str] = []
    current: Step | None = None

    def close_step():
        if current is not None:
            current.seconds = time.monotonic() - current.started
            if current.seconds >= 1.0 or verbose:
                say(
                    f"    [{time.monotonic() - t0:6.1f}s] ... {current.seconds:.1f}s"
                    f"{' (cached)' if current.cached else ''}"
                )

    stream = api.build(
        fileobj=ctx,
        custom_context=True,
        dockerfile=containerfile,
        tag=target_tag,
        buildargs=buildargs,
        network_mode=network_mode,
        pull=False,
        rm=True,
        forcerm=True,
        nocache=nocache,
        decode=True,
        target=target,
        labels=labels,
    )
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            err = chunk.get("error") or chunk.get("errorDetail", {}).get("message")
            close_step()
            raise BuildError(f"building {target_tag} failed: {err}\n--- last output ---\n" + "\n".join(tail[-40:]))
        text = chunk.get("stream")
        if not text:
            continue
        for line in text.splitlines():
            line = line.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-60:]
            m = STEP.match(line)
            if m:
                close_step()
                label = m.group("text") or m.group("dtext")
                if m.group("stage"):
                    label = f"[{m.group('stage')}/{m.group('stages')}] {m.group('n')}/{m.group('m')} {label}"
                else:
                    label = f"{m.group('n') or m.group('dn')}/{m.group('m') or m.group('dm')} {label}"
                current = Step(label, time.monotonic())
                result.steps.append(current)
                say(f"    [{time.monotonic() - t0:6.1f}s] {label[:150]}")
                continue
            if current is not None and ("Using cache" in line or line.strip() == "---> Using cache"):
                current.cached = True
                continue
            if current is not None and re.match(r"^(--> |---> )[0-9a-f]{6,}", line):
                current.layer = line.split()[-1]
                continue
            if verbose or MILESTONE.match(line):
                say(f"    [{time.monotonic() - t0:6.1f}s]     {line[:140]}")
    close_step()
    result.seconds = time.monotonic() - t0
    result.image_id = api.inspect_image(target_tag)["Id"]
    say(f"==> {target_tag} built in {result.seconds:.0f}s")
    return result


def layer_report(api, image: str) -> list[dict]:
    """The image's layers: size and the instruction that made each (newest first, as the engine reports)."""
    rows = []
    for h in api.history(image):
        created_by = (h.get("CreatedBy") or "").replace("/bin/sh -c #(nop) ", "").replace("|", "")
        created_by = re.sub(r"^/bin/bash -o pipefail -c ", "RUN ", created_by)
        rows.append({"size": int(h.get("Size") or 0), "created_by": " ".join(created_by.split())})
    return rows


def print_layers(api, image: str) -> int:
    rows = layer_report(api, image)
    total = api.inspect_image(image).get("Size") or sum(r["size"] for r in rows)
    say(f"    layers of {image} (total {total / 1e6:.0f} MB):")
    for r in reversed(rows):
        if r["size"] >= 100_000:
            say(f"      {r['size'] / 1e6:8.1f} MB  {r['created_by'][:110]}")
    return total


def expand_targets(names: list[str]) -> list[str]:
    """The images to build, in order, once each ("all": every one)."""
    targets: list[str] = []
    for t in names:
        for x in TARGETS if t == "all" else [t]:
            if x not in TARGETS:
                raise ValueError(f"unknown image {x!r}; choose from {', '.join(TARGETS)} or all")
            if x not in targets:
                targets.append(x)
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    ap.add_argument("targets", nargs="*", default=["singleuser"], help="singleuser, hub, drive, nrp or all")
    ap.add_argument(
        "--engine-socket",
        help="Docker API URL (default: $DOCKER_HOST, or the project's podman "
        "with --podman, or unix:///var/run/docker.sock)",
    )
    ap.add_argument(
        "--podman",
        action="store_true",
        help="use the project's podman environment (images/podman/podman_env.py): starts its API "
        "service if needed and builds the debootstrap base if missing",
    )
    ap.add_argument(
        "--podman-dir",
        metavar="DIR",
        help="its directory (default: $SPINNAKER_PODMAN_DIR or ~/.cache/spinnaker-jupyter/podman)",
    )
    ap.add_argument(
        "--base",
        help="BASE_IMAGE of singleuser, hub and drive (default: python:3.11-slim-bookworm; with "
        f"--podman: {podman_env.BASE_IMAGE})",
    )
    ap.add_argument("--nrp-image", help="the NRP's published image the nrp variant starts from (required for nrp)")
    ap.add_argument(
        "--nrp-user",
        default="jovyan",
        help="NB_USER of the nrp variant: keep the NRP image's own uid-1000 account name if its "
        "installation lives in that home (e.g. bbpnrsoa); default jovyan (renames it)",
    )
    ap.add_argument("--prefix", default="spinnaker-jupyter", help="image name prefix (default spinnaker-jupyter)")
    ap.add_argument("--tag", default="latest")
    ap.add_argument(
        "--arm-toolchain",
        choices=("0", "1"),
        default="1",
        help="WITH_ARM_TOOLCHAIN of the single-user image (default 1; tests use 0)",
    )
    ap.add_argument(
        "--ca-bundle",
        help="CA bundle for pip inside the build ('none': no bundle; default: pip's "
        "configured cert on this machine, if any)",
    )
    ap.add_argument(
        "--keep-service",
        action="store_true",
        help="with --podman: leave the API service running (default: stop it if this command started it)",
    )
    ap.add_argument("--network", help="build network mode (default: host with --podman, else the engine's default)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print all build output")
    args = ap.parse_args(argv)

    try:
        targets = expand_targets(args.targets)
    except ValueError as e:
        ap.error(str(e))

    import docker

    t_all = time.monotonic()
    base = args.base
    network = args.network
    url = args.engine_socket
    env = None
    started_service = False
    if args.podman or args.podman_dir:
        env = podman_env.PodmanEnv(args.podman_dir)
        say(f"==> podman environment {env.dir}")
        started_service = not env.is_running()
        url = url or env.start_service()
        t = time.monotonic()
        base = base or env.build_base_image()
        say(f"==> base image {base} ready ({time.monotonic() - t:.0f}s)")
        network = network or "host"
    url = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    api = docker.APIClient(base_url=url, timeout=3600)
    try:
        version = api.version()
    except Exception as e:  # noqa: BLE001 - say what failed, plainly
        say(f"error: no container engine answers at {url}: {e}")
        return 2
    say(
        f"==> engine {version.get('Components', [{}])[0].get('Name', 'engine')} {version.get('Version')} "
        f"(API {version.get('ApiVersion')}) at {url}"
    )

    ca = args.ca_bundle if args.ca_bundle is not None else pip_cert()
    if ca in ("none", ""):
        ca = None
    if ca and not Path(ca).is_file():
        say(f"error: CA bundle {ca} not found")
        return 2

    try:
        return _build_all(args, api, targets, base, network, ca, t_all)
    finally:
        if started_service and not args.keep_service:
            env.stop_service()


def _build_all(args, api, targets, base, network, ca, t_all) -> int:
    common = dict(ca_bundle=ca, network_mode=network, nocache=args.no_cache, verbose=args.verbose)
    name = lambda what: f"{args.prefix}/{what}:{args.tag}"  # noqa: E731
    base_args = {"BASE_IMAGE": base} if base else {}
    results: list[Result] = []
    try:
        for target in targets:
            if target == "singleuser":
                results.append(
                    build(
                        api,
                        name("singleuser"),
                        CONTAINERFILES["singleuser"],
                        {**base_args, "WITH_ARM_TOOLCHAIN": args.arm_toolchain},
                        **common,
                    )
                )
            elif target in ("hub", "drive"):
                results.append(build(api, name(target), CONTAINERFILES[target], dict(base_args), **common))
            elif target == "nrp":
                if not args.nrp_image:
                    say(
                        "==> nrp skipped: give --nrp-image (the NRP's published image; no registry is reachable "
                        "on the project's test machines, see images/README.md)"
                    )
                    continue
                layer = name("nrp-singleuser")
                results.append(
                    build(
                        api,
                        layer,
                        CONTAINERFILES["singleuser"],
                        {
                            "BASE_IMAGE": args.nrp_image,
                            "WITH_ARM_TOOLCHAIN": args.arm_toolchain,
                            "NB_USER": args.nrp_user,
                        },
                        **common,
                    )
                )
                results.append(build(api, name("nrp"), CONTAINERFILES["nrp"], {"SINGLEUSER_IMAGE": layer}, **common))
    except BuildError as e:
        say(f"error: {e}")
        return 1

    say("")
    say(f"==> done in {time.monotonic() - t_all:.0f}s")
    for r in results:
        say(f"  {r.image}  {r.seconds:.0f}s  id {r.image_id.split(':')[-1][:12]}")
        slow = [s for s in r.steps if s.seconds >= 2 and not s.cached]
        for s in slow:
            say(f"      {s.seconds:6.1f}s  {s.label[:110]}")
        print_layers(api, r.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
