"""The git_kernel settings have one source: the schema's `git_kernel` section (keys, defaults, rules). The hub sends
the whole validated section to user servers, where spinnaker_jupyter_ext.gitkernel.GitKernelConfig only reads it; one
C build order (kernels/spynnaker-git/support/make_order.txt) for the set-up and automatic_make.sh."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path

import pytest

from spinnaker_jupyter import config, hubconfig
from spinnaker_jupyter.schema import SCHEMA, defaults
from spinnaker_jupyter_ext import gitkernel
from spinnaker_jupyter_ext.gitkernel import GitKernelConfig, MakeStep, RepoSpec, slots, support

SUPPORT = Path(__file__).resolve().parents[2] / "kernels" / "spynnaker-git" / "support"


def section(**keys) -> dict:
    """An operator's git_kernel keys as the hub makes them: over the schema's defaults, validated."""
    values = config.merge(defaults(), {"git_kernel": keys})
    config.validate(values)
    return values["git_kernel"]


def test_every_schema_key_is_read_by_the_view_and_nothing_else():
    schema_keys = set(SCHEMA["properties"]["git_kernel"]["properties"])
    view_keys = {f.name for f in dataclasses.fields(GitKernelConfig)}
    assert view_keys == schema_keys | {"base_env", "slots_dir"}  # facts of the deployment, added by the hub
    for key, sub in SCHEMA["properties"]["git_kernel"]["properties"].items():
        assert len(sub.get("description", "")) > 20, f"git_kernel.{key} has no prose description"


def test_the_defaults_come_from_the_schema():
    cfg = GitKernelConfig.from_section(section())
    assert cfg.enabled and cfg.branch == "master" and cfg.base_url == "https://github.com/SpiNNakerManchester"
    assert [(r.name, r.python) for r in cfg.repos] == [
        ("spinnaker_tools", False),
        ("spinn_common", False),
        ("SpiNNUtils", True),
        ("SpiNNMachine", True),
        ("SpiNNMan", True),
        ("PACMAN", True),
        ("spalloc", True),
        ("SpiNNFrontEndCommon", True),
        ("sPyNNaker", True),
    ]
    assert (cfg.directory, cfg.kernel_name, cfg.display_name) == ("sPyNNakerGit", "spynnakergit", "sPyNNakerGit")
    assert cfg.extra_packages == ("ipykernel",) and cfg.clone_args == () and dict(cfg.kernel_env) == {}
    assert (cfg.build_c, cfg.launcher, cfg.offline, cfg.wheelhouse, cfg.pip_cache_dir) == (
        "auto",
        "auto",
        False,
        None,
        None,
    )
    assert cfg.make_order is None and cfg.base_env is None and cfg.base_python is None


def test_every_form_the_schema_allows_is_read():
    cfg = GitKernelConfig.from_section(
        dict(
            section(
                base_url="https://git.example.org/mirror",
                branch="main",
                repos=["SpiNNUtils", "spinn_common:c", {"name": "X", "url": "https://e.org/x.git", "branch": "dev"}],
                make_order=["spinn_common install", {"dir": "X/c", "install": False}, "a..b"],
                kernel_env={"XDG_CONFIG_DIRS": "/etc/spinnaker", "LEVEL": 3},
            ),
            base_env="/opt/envs/spynnaker",
        )
    )
    assert [r.python for r in cfg.repos] == [True, False, True]
    assert cfg.repos[0].clone_url(cfg.base_url) == "https://git.example.org/mirror/SpiNNUtils"
    assert cfg.repos[2] == RepoSpec("X", True, "https://e.org/x.git", "dev")
    assert [s.line() for s in cfg.make_order] == ["spinn_common install", "X/c", "a..b"]
    assert dict(cfg.kernel_env) == {"XDG_CONFIG_DIRS": "/etc/spinnaker", "LEVEL": "3"}
    assert cfg.base_python == Path("/opt/envs/spynnaker/bin/python")
    assert GitKernelConfig.from_section(json.loads(json.dumps(cfg.to_section()))) == cfg


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"repos": ["bin"]}, "git_kernel.repos.0: expected a repository NAME or NAME:c"),
        ({"repos": ["../x"]}, "git_kernel.repos.0: expected a repository NAME or NAME:c"),
        ({"repos": [{"name": "x", "urll": "u"}]}, "git_kernel.repos.0.urll: unknown key; did you mean 'url'?"),
        ({"repos": []}, "git_kernel.repos: [] should be non-empty"),
        ({"build_c": "maybe"}, "git_kernel.build_c: expected one of 'auto', 'always', 'never', got 'maybe'"),
        ({"make_order": ["/abs"]}, "git_kernel.make_order.0: expected DIR or 'DIR install', DIR relative to"),
        ({"make_order": ["a/../b install"]}, "git_kernel.make_order.0: expected DIR or 'DIR install'"),
        ({"kernel_name": "Big"}, "git_kernel.kernel_name: expected lower-case letters, digits, . _ - only, got 'Big'"),
        ({"directory": "a/b"}, "git_kernel.directory: expected a plain folder name"),
        ({"launcher": "-m x"}, "git_kernel.launcher: expected auto or a Python module name"),
        ({"kernel_env": {"1X": "v"}}, "git_kernel.kernel_env: expected environment variable names"),
        ({"extra_packages": "ipykernel"}, "git_kernel.extra_packages: expected array, got 'ipykernel'"),
        ({"repos": ["A", {"name": "B"}, "A:c", {"name": "B"}]}, "git_kernel.repos: A, B named more than once"),
    ],
)
def test_a_bad_value_gives_one_clear_line(write_config, keys, words):
    with pytest.raises(config.ConfigError) as err:
        config.load([write_config({"git_kernel": keys})])
    message = str(err.value)
    assert words in message and "\n" not in message, message
    assert "spinnaker-jupyter.yaml" in message or "named more than once" in message  # where, for the file's errors


def test_the_hub_sends_the_whole_validated_section(write_config):
    d = config.load([write_config({"git_kernel": {"branch": "main", "repos": ["SpiNNUtils"]}})])
    sent = json.loads(hubconfig.user_server_env(d)[gitkernel.CONFIG_ENV])
    slots_dir = d.data_dir / "git-kernel-slots"
    assert sent == dict(d["git_kernel"], base_env=str(d.envs_dir / "spynnaker"), slots_dir=str(slots_dir))
    cfg = GitKernelConfig.from_env({gitkernel.CONFIG_ENV: json.dumps(sent)})
    assert cfg.branch == "main" and [r.name for r in cfg.repos] == ["SpiNNUtils"]
    assert cfg.base_python == d.envs_dir / "spynnaker" / "bin" / "python"
    off = config.load([write_config({"git_kernel": {"enabled": False}})])
    assert gitkernel.CONFIG_ENV not in hubconfig.user_server_env(off)
    assert GitKernelConfig.from_env({}) is None


def test_a_section_from_another_version_is_refused_in_one_line():
    partial = {k: v for k, v in section().items() if k not in ("launcher", "kernel_env")}
    with pytest.raises(ValueError) as err:
        GitKernelConfig.from_section(partial)
    assert "lacks kernel_env, launcher" in str(err.value) and "\n" not in str(err.value)


def test_one_c_build_order_shipped_for_the_set_up_and_automatic_make():
    shipped = gitkernel.read_make_order(SUPPORT / gitkernel.MAKE_ORDER_FILE)
    assert shipped == (
        MakeStep("spinnaker_tools", True),
        MakeStep("spinn_common", True),
        MakeStep("SpiNNFrontEndCommon/c_common/front_end_common_lib", True),
        MakeStep("SpiNNFrontEndCommon/c_common", True),
        MakeStep("sPyNNaker/neural_modelling", True),
    )
    assert support.make_steps(None) == list(shipped)  # the set-up's default is the file, read
    assert support.make_steps((MakeStep("x"),)) == [MakeStep("x")]
    script = (SUPPORT / "automatic_make.sh").read_text()
    assert "spinnaker_tools spinn_common" not in script and "DIRS=(spinnaker_tools" not in script  # no copy of it
    assert 'done < "$SUPPORT_DIR/make_order.txt"' in script


def test_the_hub_makes_one_slot_per_set_up_at_a_time(write_config):
    def slots_of(concurrency):
        d = config.load([write_config({"git_kernel": {"concurrency": concurrency}})])
        folder = hubconfig.git_kernel_slots(d)
        return folder, sorted(p.name for p in (d.data_dir / "git-kernel-slots").glob("*"))

    folder, names = slots_of(3)
    assert names == ["slot-0", "slot-1", "slot-2"] and oct(os.stat(folder).st_mode & 0o777) == "0o755"
    assert all(os.stat(Path(folder) / n).st_mode & 0o777 == 0o644 for n in names)
    assert slots_of(1)[1] == ["slot-0"]
    assert len(slots_of(None)[1]) == max(1, len(os.sched_getaffinity(0)) // 2)  # the default: half the cores
    assert slots_of(0) == (None, [])


def test_a_set_up_waits_for_a_free_slot_and_trusts_only_the_hubs(tmp_path):
    folder = tmp_path / "slots"
    folder.mkdir(mode=0o755)
    (folder / "slot-0").touch(mode=0o644)
    waited, gave_up = [], []
    held = os.open(folder / "slot-0", os.O_RDONLY)  # another set-up's turn
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with slots.turn(folder, waited.append, max_wait=0.0, on_give_up=lambda: gave_up.append(True)):
        pass
    assert waited == [1] and gave_up == [True]
    os.close(held)
    waited.clear()
    with slots.turn(folder, waited.append, max_wait=0.0):
        other = os.open(folder / "slot-0", os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # this set-up holds the only slot while it works
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    assert waited == []
    os.chmod(folder, 0o777)  # a folder others can write: its files could be anyone's; no bound then
    assert slots.slot_files(folder) == []
    assert slots.slot_files(None) == [] and slots.slot_files(tmp_path / "absent") == []
