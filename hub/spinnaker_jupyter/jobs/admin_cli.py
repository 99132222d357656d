"""`spinnaker-jupyter jobs list|show|cancel|purge`: the operator's view of the batch jobs, straight from the job
store (so it works with the hub up or down, like `user remove`).

A running job that is cancelled here is only flagged in the store: its runner stops it within a second and says so
in its log (or, when the job service is down, at its next start). Purge deletes ended jobs with their log, outputs
and scratch folder; queued and running jobs are never purged.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..config import ConfigError, Deployment

OPERATOR = "by an operator (spinnaker-jupyter jobs cancel)"


def _store(d: Deployment):
    from .settings import db_url
    from .store import Store

    url = db_url(d)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        raise ConfigError(
            f"no job store at {url[len('sqlite:///') :]}: the job service has never run here "
            "(jobs.enabled) or data_dir is another one"
        )
    return Store(url)


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:  # SQLite gives naive datetimes back; they were stored as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _job_or_fail(store, job_id: int):
    job = store.get(job_id)
    if job is None:
        raise ConfigError(f"no job {job_id} in the job store (`spinnaker-jupyter jobs list` shows them)")
    return job


def _summary(job) -> dict:
    return {
        "id": job.id,
        "user": job.user_id,
        "status": job.status,
        "collab": job.collab,
        "submitted": _when(job.timestamp_submission),
        "started": _when(job.timestamp_started),
        "ended": _when(job.timestamp_completion),
        "attempts": job.attempts,
        "detail": job.detail or "",
    }


def cmd_list(d: Deployment, args) -> int:
    from .store import STATUSES

    bad = [s for s in args.state or [] if s not in STATUSES]
    if bad:
        raise ConfigError(f"--state {bad[0]}: unknown state; one of {', '.join(STATUSES)}")
    store = _store(d)
    jobs = store.all_jobs(args.user or [], args.state or [])
    rows = [_summary(j) for j in jobs]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("No jobs" + (" matching the filters." if args.user or args.state else "."))
        return 0
    print(f"{'ID':>6}  {'USER':<16} {'STATE':<10} {'COLLAB':<22} {'SUBMITTED':<19}  {'ENDED':<19}  DETAIL")
    for r in rows:
        print(
            f"{r['id']:>6}  {r['user']:<16} {r['status']:<10} {r['collab']:<22} {r['submitted']:<19}  "
            f"{r['ended']:<19}  {r['detail']}".rstrip()
        )
    return 0


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:  # the last 256 KiB are plenty for a tail; a log may be megabytes
        f.seek(0, 2)
        f.seek(max(0, f.tell() - (256 << 10)))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def cmd_show(d: Deployment, args) -> int:
    from .settings import jobs_dir

    store = _store(d)
    job = _job_or_fail(store, args.id)
    info = _summary(job)
    files = json.loads(job.output_files or "[]")
    info.update(
        command=job.command,
        code=job.code if len(job.code) < 200 else f"(inline script, {len(job.code)} characters)",
        hardware_config=json.loads(job.hardware_config) if job.hardware_config else None,
        tags=json.loads(job.tags or "[]"),
        input_data=json.loads(job.input_data) if job.input_data else None,
        core_hours=job.resource_usage,
        outputs=[f"{f['path']} ({f['size']} bytes)" for f in files],
        cancel_requested=job.cancel_requested,
    )
    log_path = jobs_dir(d) / "logs" / f"{job.id}.log"
    tail = _tail(log_path, args.lines)
    if args.json:
        print(json.dumps({**info, "log_tail": tail}, indent=1))
        return 0
    for key, value in info.items():
        if value not in (None, "", [], False):
            print(f"{key + ':':<18} {value}")
    print(f"log ({log_path}, last {args.lines} lines):")
    print("\n".join("  " + line for line in tail.splitlines()) if tail else "  (empty)")
    return 0


def cmd_cancel(d: Deployment, args) -> int:
    from .runner import JobLog, _stamp
    from .settings import jobs_dir
    from .store import ACTIVE

    store = _store(d)
    code = 0
    for job_id in args.ids:
        job = store.get(job_id)
        if job is None:
            print(f"job {job_id}: no such job")
            code = 2
            continue
        if job.status not in ACTIVE:
            print(f"job {job_id} ({job.user_id}): already {job.status}, nothing to cancel")
            continue
        before = store.request_removal(job_id, OPERATOR)
        if before == "submitted":
            JobLog.append(
                jobs_dir(d) / "logs" / f"{job_id}.log",
                f"{_stamp()}: cancelled {OPERATOR} while it was queued; it does not run.",
            )
            print(f"job {job_id} ({job.user_id}): was queued, removed")
        elif before == "running":
            print(
                f"job {job_id} ({job.user_id}): running; its runner stops it within a second (or at the next "
                "start of the job service), and its log says it was cancelled by an operator"
            )
        else:  # ended between the read and the cancel
            print(f"job {job_id} ({job.user_id}): already {before}, nothing to cancel")
    return code


def cmd_purge(d: Deployment, args) -> int:
    from .settings import jobs_dir

    if args.days < 0:
        raise ConfigError("--days: give a number of days, 0 or more")
    store = _store(d)
    before = datetime.now(timezone.utc) - timedelta(days=args.days)
    data = jobs_dir(d)
    jobs = store.ended_before(before)
    freed = 0
    for job in jobs:
        paths = [data / "logs" / f"{job.id}.log", data / "outputs" / str(job.id), data / "work" / str(job.id)]
        for path in paths:
            freed += _size(path)
            if not args.dry_run:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not args.dry_run:
            store.delete(job.id)
    what = "would be deleted" if args.dry_run else "deleted"
    ids = ", ".join(str(j.id) for j in jobs[:20]) + (", ..." if len(jobs) > 20 else "")
    print(
        f"{len(jobs)} job(s) that ended before {before:%Y-%m-%d %H:%M} UTC {what} with their files "
        f"({freed / 2**20:.1f} MiB){': ' + ids if jobs else ''}"
    )
    return 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "cancel": cmd_cancel, "purge": cmd_purge}


def register(add, load) -> None:
    """Add `jobs` to the operator's CLI; `add(name, fn, help)` is cli.parser's helper, `load(args)` its config
    loader."""

    def run(args) -> int:
        _check_args(args)
        return COMMANDS[args.action](load(args), args)

    j = add("jobs", run, "batch jobs: list | show ID | cancel ID... | purge --days N (from the job store)")
    j.add_argument("action", choices=list(COMMANDS))
    j.add_argument("ids", nargs="*", type=int, help="(show, cancel) job id(s)")
    j.add_argument("--user", action="append", help="(list) only this user's jobs (repeatable)")
    j.add_argument(
        "--state",
        action="append",
        help="(list) only jobs in this state (repeatable): submitted, running, finished, error, removed",
    )
    j.add_argument("--lines", type=int, default=20, help="(show) lines of the log's end shown (default 20)")
    j.add_argument("--days", type=int, help="(purge) delete jobs that ended more than this many days ago")
    j.add_argument("--dry-run", action="store_true", help="(purge) say what would be deleted, delete nothing")
    j.add_argument("--json", action="store_true", help="(list, show) print JSON")


def _check_args(args) -> None:
    if args.action == "show" and len(args.ids) != 1:
        raise ConfigError("`jobs show` needs one job ID")
    if args.action == "cancel" and not args.ids:
        raise ConfigError("`jobs cancel` needs one or more job IDs")
    if args.action == "purge" and args.days is None:
        raise ConfigError(
            "`jobs purge` needs --days N: jobs that ended more than N days ago are deleted with their log and outputs"
        )
    if args.action == "show":
        args.id = args.ids[0]
