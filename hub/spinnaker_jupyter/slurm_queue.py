"""What the Slurm commands say, read the same way for user servers (slurm.py) and batch jobs (jobs/slurm_executor.py):
`scontrol -o show job` parsed, a pending reason in words, sbatch's refusals as one line naming the config key, and
what `spinnaker-jupyter check` asks of the cluster (`probe`).
No JupyterHub or batchspawner in here: the job service imports it too."""

from __future__ import annotations

import os
import re
from pathlib import Path

#: What Slurm's pending reasons mean for someone waiting (the others are said as Slurm says them).
REASONS = {
    "Resources": " (the cluster's nodes are busy; you start when a server or job ends)",
    "Licenses": " (all SpiNNaker boards are in use; you start when one is given back)",
    "Priority": " (jobs with higher priority are ahead of you)",
    "QOSMaxJobsPerUserLimit": " (you already have as many jobs as your QoS allows)",
}

#: Job states after which a job runs no more (not COMPLETING: its processes are still being ended, and scontrol says
#: COMPLETING in place of how it ended, e.g. TIMEOUT).
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
    "SPECIAL_EXIT",
    "REVOKED",
}


def pending_words(reason: str) -> str:
    if reason in ("None", ""):  # just submitted
        return "not yet looked at by the scheduler"
    return f"reason {reason}{REASONS.get(reason, '')}"


def parse_show(text: str) -> dict[str, str]:
    """`scontrol -o show job ID` (one line of Key=Value): the values up to the next space."""
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", text))


def exit_code(value: str) -> int:
    """Slurm's ExitCode `code:signal` as a process return code (negative: the signal that ended it)."""
    code, _, sig = value.partition(":")
    try:
        return -int(sig) if sig and int(sig) else int(code)
    except ValueError:
        return 1


def sbatch_error(stderr: str, keys: dict[str, str], values: dict[str, str]) -> str | None:
    """sbatch's refusal in one line naming the deployment key to change, or None when it is none of these.
    `keys`: what names partition / account / qos / license / conf / memory in the config; `values`: their values."""
    text = " ".join(stderr.split())
    checks = [
        (r"invalid partition", "partition", "the partition '{v}' does not exist; set {k} to one `sinfo` lists"),
        (
            r"invalid account",
            "account",
            ("the account '{v}' is not valid here; set {k} to one `sacctmgr show assoc` lists for this user"),
        ),
        (r"invalid qos", "qos", "the QoS '{v}' is not valid; fix {k}"),
        (
            r"invalid license",
            "license",
            (
                "the cluster has no licence '{v}' for SpiNNaker boards; add "
                "`Licenses={v}:<boards>` to slurm.conf or set {k}"
            ),
        ),
        (
            r"Requested node configuration is not available|Memory specification can not be satisfied",
            "memory",
            "no node of the partition has the memory asked for; lower {k}",
        ),
        (
            r"Unable to process configuration file|s_p_parse_file|Could not establish a configuration source",
            "conf",
            (
                "the Slurm commands cannot read their configuration; set {k} to a slurm.conf every user's account can "
                "read"
            ),
        ),
        (
            r"Unable to contact slurm controller|Connection refused|connect failure|Socket timed out",
            "",
            "the Slurm cluster is not answering (its controller cannot be reached); the operator checks slurmctld",
        ),
    ]
    for pattern, what, words in checks:
        if re.search(pattern, text, re.IGNORECASE):
            return words.format(k=keys.get(what, what), v=values.get(what, "")) + f" ({text})"
    return None


def probe(d) -> list[tuple[bool, str]]:
    """What `spinnaker-jupyter check` says of the Slurm cluster the deployment uses: the controller answers, each
    partition it names exists, the board licence is there. One (ok, line) each."""
    import subprocess

    sl = d["spawner"]["slurm"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if sl["conf"]:
        env["SLURM_CONF"] = str(d.path(sl["conf"], Path()))
    conf = env.get("SLURM_CONF", "the system's slurm.conf")
    if "SLURM_CONF" in env and not os.access(env["SLURM_CONF"], os.R_OK):
        return [(False, f"Slurm: spawner.slurm.conf {conf} cannot be read; set it to the cluster's slurm.conf")]

    def run(*argv: str) -> tuple[int, str]:
        try:
            p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=15, check=False)
        except FileNotFoundError:
            return 127, f"{argv[0]} is not installed (Debian: apt-get install slurm-client)"
        except subprocess.TimeoutExpired:
            return 124, f"{' '.join(argv)} did not answer within 15 s"
        return p.returncode, " ".join((p.stdout + " " + p.stderr).split())

    code, said = run("scontrol", "ping")
    if code != 0 or "UP" not in said:
        return [
            (
                False,
                f"Slurm: the controller is not answering ({said}); start slurmctld, or point "
                f"spawner.slurm.conf at the cluster's slurm.conf (now {conf})",
            )
        ]
    out = [(True, f"Slurm: the controller answers ({said}; {conf})")]
    wanted = {}
    if d["spawner"]["type"] == "slurm":
        wanted[sl["partition"]] = "spawner.slurm.partition"
    if d["jobs"]["enabled"] and d["jobs"]["executor"] == "slurm":
        wanted.setdefault(d["jobs"]["slurm"]["partition"] or sl["partition"], "jobs.slurm.partition")
    code, said = run("sinfo", "-h", "-o", "%P %a %D")
    names, default = {}, None
    if code == 0:
        for name, avail, nodes in zip(*[iter(said.split())] * 3, strict=False):
            if name.endswith("*"):  # (sinfo marks the default partition)
                name = default = name[:-1]
            names[name] = (avail, nodes)
    for partition, key in wanted.items():
        name = partition or default
        if name in names:
            avail, nodes = names[name]
            out.append(
                (
                    avail == "up",
                    f"Slurm: partition {name} ({key}{'' if partition else ', the default'}) "
                    f"is {avail} with {nodes} node(s)",
                )
            )
        else:
            out.append(
                (
                    False,
                    f"Slurm: no partition {partition or '(default)'} ({key}); set it to one of: "
                    f"{', '.join(sorted(names)) or 'none found'}",
                )
            )
    lic = sl["board_license"]
    if lic and d["spinnaker"]["mode"] in ("session", "machine"):
        code, said = run("scontrol", "-o", "show", "lic", lic)
        total = re.search(r"Total=(\d+)", said)
        free = re.search(r"Free=(\d+)", said)
        if code == 0 and total:
            out.append(
                (
                    True,
                    f"Slurm: licence {lic}: {total.group(1)} board(s) (Licenses= in slurm.conf), "
                    f"{free.group(1) if free else '?'} free",
                )
            )
        else:
            out.append(
                (
                    False,
                    f"Slurm: no licence {lic} for SpiNNaker boards; add `Licenses={lic}:<boards>` to "
                    "slurm.conf, or set spawner.slurm.board_license: null (boards then not counted)",
                )
            )
    return out
