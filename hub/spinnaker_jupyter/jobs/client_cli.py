"""`spinnaker-jupyter-job`: the `nmpi run` experience against this deployment's job service.

    spinnaker-jupyter-job run [-b] [-o DIR] [--config JSON] [--tag T] script.py [ARGS...]
    spinnaker-jupyter-job check [-o DIR] JOB_ID

`run` uploads the script's folder as a .tar.gz to the service (nmpi's own CLI would put it on EBRAINS Drive),
submits `script.py {system} ARGS`, and unless -b follows the job, saying each change of state in words, then
downloads its log and output files into DIR (default ./job_<id>). `check` says where a job is and, once it has
ended, downloads the same. The service and token come from --url / --token, else SPINNAKER_JOBS_URL and
SPINNAKER_JOBS_TOKEN or JUPYTERHUB_API_TOKEN (set inside a server of this hub), else the config file
~/.config/spinnaker-jupyter/job.json ({"url": ..., "token": ...}, which must be private to you: mode 0600).
Standard library only, so it also runs on a laptop.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CONFIG = Path("~/.config/spinnaker-jupyter/job.json")
SKIP = {".git", "__pycache__", ".ipynb_checkpoints", "reports"}
WORDS = {
    "submitted": "is queued",
    "running": "is running",
    "finished": "finished",
    "error": "ended with an error",
    "removed": "was cancelled",
}


class Failure(Exception):
    """One line for the user; exit code 2."""


def settings(args) -> tuple[str, str]:
    cfg = {}
    path = Path(os.environ.get("SPINNAKER_JOBS_CONFIG", CONFIG)).expanduser()
    if path.exists():
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise Failure(f"{path} holds a token but others may read it: run `chmod 600 {path}`")
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise Failure(f'{path}: not valid JSON ({e}); expected {{"url": ..., "token": ...}}') from None
    url = args.url or os.environ.get("SPINNAKER_JOBS_URL") or cfg.get("url")
    token = (
        args.token
        or os.environ.get("SPINNAKER_JOBS_TOKEN")
        or os.environ.get("JUPYTERHUB_API_TOKEN")
        or cfg.get("token")
    )
    if not url:
        raise Failure(f'No job service given: use --url, set SPINNAKER_JOBS_URL, or put "url" in {path}')
    if not token:
        raise Failure(
            "No token given: use --token, set SPINNAKER_JOBS_TOKEN (a token from the hub's Token page), "
            f'or put "token" in {path}'
        )
    return url.rstrip("/"), token


class Service:
    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("detail")
            except ValueError:
                detail = None
            if e.code == 401 or e.code == 403 and not detail:
                raise Failure(
                    f"The job service at {self.url} refused the token ({e.code}): get a new one from the "
                    "hub's Token page"
                ) from None
            raise Failure(f"The job service said: {detail or e.reason} ({e.code})") from None
        except urllib.error.URLError as e:
            raise Failure(f"Cannot reach the job service at {self.url}: {e.reason}") from None


def archive(folder: Path) -> bytes:
    buf = io.BytesIO()

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        return None if any(p in SKIP for p in parts) or info.issym() or info.islnk() else info

    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name, filter=keep)
    return buf.getvalue()


def download(svc: Service, job: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"job_{job['id']}.log").write_text(job.get("log") or "")
    root = out.resolve()
    for f in job["output_data"]["files"]:
        target = (out / f["path"]).resolve()
        if root not in target.parents:
            print(f"Skipped {f['path']}: outside {out}", file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f["url"], timeout=300) as r, open(target, "wb") as w:
            while chunk := r.read(1 << 16):
                w.write(chunk)
    print(f"Log and {len(job['output_data']['files'])} output file(s) saved in {out}")


def follow(svc: Service, job_id: int, out: Path | None) -> int:
    last, delay = None, 0.5
    while True:
        job = svc.call("GET", f"/jobs/{job_id}")
        if job["status"] != last:
            last = job["status"]
            print(f"Job {job_id} {WORDS.get(last, last)}", flush=True)
            delay = 0.5
        if last not in ("submitted", "running"):
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 5)
    job = svc.call("GET", f"/jobs/{job_id}?with_log=true")
    if last == "error":
        tail = "\n".join((job.get("log") or "").splitlines()[-10:])
        print(f"Last lines of its log:\n{tail}", file=sys.stderr)
    if last != "removed":
        download(svc, job, out or Path(f"job_{job_id}"))
    return 0 if last == "finished" else 1


def cmd_run(args) -> int:
    script = Path(args.script)
    if not script.is_file() or script.suffix != ".py":
        raise Failure(f"{script}: not a Python script (give e.g. run.py)")
    svc = Service(*settings(args))
    config = None
    if args.config:
        try:
            config = json.loads(args.config)
        except ValueError as e:
            raise Failure(f"--config: not valid JSON ({e}); e.g. '{{\"time_limit\": 600}}'") from None
    me = svc.call("GET", "/userinfo")["preferred_username"]
    upload = svc.call("POST", "/uploads", archive(script.resolve().parent), "application/gzip")
    command = " ".join([script.name, "{system}", *args.args])
    job = svc.call(
        "POST",
        "/jobs/",
        json.dumps(
            {
                "code": upload["url"],
                "command": command,
                "collab": args.collab or f"private-{me}",
                "hardware_platform": "SpiNNaker",
                "hardware_config": config,
                "tags": args.tag or [],
            }
        ).encode(),
    )
    print(f"Job {job['id']} submitted ({script.resolve().parent} as {upload['size']} bytes)", flush=True)
    if args.batch:
        print(f"Follow it with: spinnaker-jupyter-job check {job['id']}")
        return 0
    return follow(svc, job["id"], Path(args.output) if args.output else None)


def cmd_check(args) -> int:
    svc = Service(*settings(args))
    job = svc.call("GET", f"/jobs/{args.job_id}?with_log=true")
    print(f"Job {job['id']} {WORDS.get(job['status'], job['status'])}")
    if job["status"] in ("finished", "error"):
        download(svc, job, Path(args.output or f"job_{job['id']}"))
    return {"finished": 0, "error": 1}.get(job["status"], 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="spinnaker-jupyter-job",
        description="Run batch jobs on this SpiNNaker Jupyter deployment's job service (the nmpi API).",
    )
    p.add_argument("--url", help="the job service (default: SPINNAKER_JOBS_URL, or the config file)")
    p.add_argument(
        "--token", help="a hub API token (default: SPINNAKER_JOBS_TOKEN, JUPYTERHUB_API_TOKEN, or the config file)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="upload the script's folder, run the script, follow it, fetch the outputs")
    run.add_argument("-b", "--batch", action="store_true", help="submit and return at once (then use `check`)")
    run.add_argument("-o", "--output", help="folder for the log and outputs (default ./job_<id>)")
    run.add_argument("--config", help="hardware config as JSON, e.g. '{\"time_limit\": 600}'")
    run.add_argument("--collab", help="collab to submit to (default private-<you>)")
    run.add_argument("--tag", action="append", help="a tag (repeatable)")
    run.add_argument("script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments after {system}")
    check = sub.add_parser("check", help="say where a job is; once it has ended, fetch its log and outputs")
    check.add_argument("-o", "--output", help="folder for the log and outputs (default ./job_<id>)")
    check.add_argument("job_id", type=int)
    args = p.parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_check(args)
    except Failure as e:
        print(f"spinnaker-jupyter-job: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
