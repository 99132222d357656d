"""One job's steps before and while its command runs: read its hardware config, fetch its code into its scratch
folder, download its input data, install its extra pip packages, build its environment and command line, and run
the command under the job's time, output and cancel watch (saying which limit ended it). Each step notes what it
does in the job's log and ends the job with one line (JobFailed) when it cannot be done."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ..kernels import Release
from . import archives, fetch, hardware_config, inputs
from .executor import Account, Executor
from .job_boards import max_boards
from .joblog import JobFailed, JobLog
from .settings import Settings
from .store import Job, Store

SYSTEM = "spiNNaker"  # what {system} in a job's command becomes (the PyNN backend name, as on EBRAINS)
INTERNAL = ".job"  # the runner's own files in a scratch folder (never collected as outputs)


def read_hardware_config(s: Settings, versions: list[str], job: Job) -> dict:
    try:
        # (the user's share of boards was checked at submission, with their groups, which are not known here)
        return hardware_config.parse(
            job.hardware_config, s.allowed_keys, versions, s.pip_packages, s.wall_time, max_boards(s.spinnaker)
        )
    except hardware_config.HardwareConfigError as e:
        raise JobFailed(str(e)) from None


def prepare(s: Settings, executor: Executor, job: Job, scratch: Path, account: Account, jlog: JobLog) -> dict:
    """Fetch the code into a staging folder, then hand it to the job's account as its scratch folder. A clone
    is made by the account itself; an archive or inline script is written by the service into a folder of its
    own (so that nothing the user's other processes do can redirect its writes) and then given away."""
    staging = s.data / f"staging-{job.id}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    staging.mkdir(mode=0o711)
    os.chmod(staging, 0o711)  # the account reaches its own folder inside, nothing else
    code = staging / "code"
    code.mkdir(mode=0o700)
    kind = fetch.kind_of(job.code)
    by_user = kind == "git"
    if by_user:
        os.chown(code, account.uid, account.gid)
    try:
        jlog.note(
            {
                "inline": "Code: the script given with the job (saved as run.py).",
                "git": f"Code: cloning {job.code.strip()} (shallow, no submodules).",
                "archive": f"Code: downloading and unpacking {job.code.strip()}.",
            }[kind]
        )
        try:
            info = fetch.fetch(job.code, code, s.fetch_limits, executor.as_account(account))
        except fetch.FetchError as e:
            raise JobFailed(str(e)) from None
        if not by_user:
            for dirpath, dirs, names in os.walk(code):
                for name in [*dirs, *names]:
                    os.lchown(os.path.join(dirpath, name), account.uid, account.gid)
            os.chown(code, account.uid, account.gid)
        os.chmod(code, 0o700)
        code.rename(scratch)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    internal = scratch / INTERNAL  # made by the account, as the job's first process would
    made = subprocess.run(
        ["mkdir", "-p", "--", str(internal)],
        preexec_fn=executor.as_account(account),
        capture_output=True,
        text=True,
        cwd="/",
    )
    if made.returncode != 0:
        raise JobFailed(f"Could not prepare the job's folder: {made.stderr.strip()}")
    return info


def download_inputs(
    s: Settings, executor: Executor, job: Job, scratch: Path, account: Account, jlog: JobLog
) -> list[dict]:
    items = json.loads(job.input_data)
    jlog.note(
        f"Input data: downloading {len(items)} file(s) into the job's folder (at most "
        f"{s.input_bytes // 2**20} MiB in all)."
    )
    try:
        return inputs.download(
            items, scratch, s.input_bytes, s.fetch_limits.timeout, executor.as_account(account), say=jlog.note
        )
    except inputs.InputError as e:
        raise JobFailed(str(e)) from None


def _python(s: Settings, release: Release | None) -> Path:
    """The job's interpreter: that of the sPyNNaker release its hardware_config picked (Settings.release)."""
    return release.python if release is not None else s.python


def env_for(s: Settings, job: Job, scratch: Path, account: Account, release: Release | None = None) -> dict:
    # HOME is the scratch folder: a user's own ~/.spynnaker.cfg would make a second cfg (sPyNNaker refuses two).
    return {
        "PATH": f"{_python(s, release).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "USER": account.name,
        "LOGNAME": account.name,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "XDG_CONFIG_DIRS": str(s.cfg_dir),
        "TMPDIR": str(scratch / INTERNAL),
        "PYTHONPATH": str(scratch / INTERNAL / "packages"),
        "SPINNAKER_JOB_ID": str(job.id),
        # caches (matplotlib's font list, pip's) are not the job's outputs
        "XDG_CACHE_HOME": str(scratch / INTERNAL / "cache"),
        "MPLCONFIGDIR": str(scratch / INTERNAL / "mpl"),
    }


def argv_for(s: Settings, job: Job, scratch: Path, release: Release | None = None) -> list[str]:
    command = (job.command or "run.py {system}").replace("{system}", SYSTEM)
    try:
        words = shlex.split(command)
    except ValueError as e:
        raise JobFailed(f"command: cannot be read ({e}); give e.g. 'run.py {{system}}'") from None
    script = words[0] if words else ""
    rel = archives.safe_relpath(script)
    if not script.endswith(".py") or rel is None:
        raise JobFailed(
            f"command: {command!r} must start with a Python script inside the job's code (a "
            "relative path ending in .py), e.g. 'run.py {system}'"
        )
    if not (scratch / rel).is_file():
        found = sorted(p.name for p in scratch.glob("*.py"))[:10]
        raise JobFailed(
            f"command: the script {rel} is not in the job's code (Python files at its top: "
            f"{', '.join(found) or 'none'})"
        )
    return [str(_python(s, release)), rel, *words[1:]]


async def pip_install(
    s: Settings,
    executor: Executor,
    reqs: list[str],
    scratch: Path,
    env: dict,
    account: Account,
    jlog: JobLog,
    release: Release | None = None,
) -> None:
    jlog.note(f"Installing {', '.join(reqs)} for this job (hardware_config.extra_pip_installs).")
    argv = [
        str(_python(s, release)),
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--target",
        str(scratch / INTERNAL / "packages"),
        *reqs,
    ]
    proc = await executor.start(argv, scratch, env, s.run_limits, account)
    try:
        while chunk := await proc.stdout.read(1 << 16):
            jlog.write(chunk.decode(errors="replace"))
        code = await proc.wait()
    finally:
        executor.kill(proc.pid, None)
        executor.ended(proc.pid)
    if code != 0:
        raise JobFailed(
            f"hardware_config.extra_pip_installs: pip could not install {', '.join(reqs)} (see the log above)"
        )


async def execute(
    s: Settings,
    executor: Executor,
    store: Store,
    job: Job,
    argv,
    scratch: Path,
    env: dict,
    account: Account,
    wall: int,
    jlog: JobLog,
) -> tuple[int, str | None]:
    """Run the job's command, its output streamed to the log. Returns (exit code, why the service stopped it or
    which limit it met, None when neither)."""
    proc = await executor.start(argv, scratch, env, s.run_limits, account)
    store.set_process(job.id, proc.pid, account.uid)
    why: list[str] = []

    tail = bytearray()

    async def pump():  # chunks, not lines: a job may print a megabyte without a newline
        while chunk := await proc.stdout.read(1 << 16):
            jlog.write(chunk.decode(errors="replace"))
            tail.extend(chunk)
            del tail[:-4096]

    async def watch():
        t_end = time.monotonic() + wall
        while proc.returncode is None:
            reason = None
            if time.monotonic() > t_end:
                reason = f"The job ran for longer than its time limit of {wall} s and was stopped"
            elif _tree_size(scratch, skip=INTERNAL) > s.output_bytes:
                reason = (
                    f"The job wrote more than {s.output_bytes // 2**20} MiB (jobs.limits.output_mb) and was stopped"
                )
            elif store.cancel_requested(job.id):
                reason = f"The job was cancelled {store.cancel_words(job.id)}"
            if reason:
                why.append(reason)
                executor.kill(proc.pid, None)
                return
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    try:
        await pump()
        code = await proc.wait()
    except asyncio.CancelledError:
        executor.kill(proc.pid, None)
        raise
    finally:
        watcher.cancel()
        executor.kill(proc.pid, None)  # whatever it left running in the background
        executor.ended(proc.pid)
        store.set_process(job.id, None, None)
    if (
        not why
        and code != 0
        and (
            code == -signal.SIGXFSZ
            or _largest_file(scratch) >= s.output_bytes
            or _tree_size(scratch, skip=INTERNAL) > s.output_bytes
        )
    ):
        # Python ignores SIGXFSZ: past the file-size limit its write fails (EFBIG) and the script ends with 1.
        why.append(f"The job wrote more than {s.output_bytes // 2**20} MiB (jobs.limits.output_mb) and was stopped")
    if not why and code == -signal.SIGXCPU:
        why.append(
            f"The job used more than {s.run_limits.cpu_seconds} s of CPU time (jobs.limits.cpu_time) and was stopped"
        )
    if not why and code != 0:  # the limits a program meets as errors of its own: say which limit it was
        said = tail.decode(errors="replace")
        if "MemoryError" in said or "Cannot allocate memory" in said:
            why.append(
                f"The job ran out of memory: each of its processes may use at most "
                f"{s.run_limits.memory_bytes // 2**20} MiB (jobs.limits.memory_mb)"
            )
        elif "Resource temporarily unavailable" in said and ("fork" in said or "BlockingIOError" in said):
            why.append(
                f"The job started too many processes: at most {s.run_limits.processes} at once (jobs.limits.processes)"
            )
    return code, (why[0] if why else None)


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "unknown"


def _tree_size(root: Path, skip: str = "") -> int:
    total = 0
    for dirpath, dirs, files in os.walk(root):
        if skip and os.path.relpath(dirpath, root) == skip:
            dirs[:] = []
            continue
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _largest_file(root: Path) -> int:
    largest = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                largest = max(largest, os.lstat(os.path.join(dirpath, name)).st_size)
            except OSError:
                pass
    return largest
