"""The sPyNNaker cfg of every mode (hub/spinnaker_jupyter/spynnaker_cfg.py): the text kernels read, pinned as it was
when the cfg was rendered in spalloc.py and parsed back in kernels.py, and what bad values get."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

from spinnaker_jupyter import spynnaker_cfg
from spinnaker_jupyter.spynnaker_cfg import CfgError, ClaimedBoards

PACKAGE = Path(spynnaker_cfg.__file__).parent

SPINNAKER = {
    "mode": "virtual",
    "version": 5,
    "machine_name": "192.168.240.253",
    "extra_cfg": {"Reports": {"write_energy_report": False}, "Machine": {"max_sdram_allowed_per_chip": 1000}},
    "spalloc": {
        "url": "https://spalloc.example.org/spalloc/srv/spalloc",
        "group": "course-a",
        "machine_name": None,
        "use_proxy": True,
    },
}
WRITTEN_BY = "# Written by spinnaker-jupyter from the deployment config; edits here are replaced at start-up.\n"
EXTRA = "max_sdram_allowed_per_chip = 1000\n\n[Reports]\nwrite_energy_report = False\n\n"
# The texts the kernels saw before this module (kernels.spynnaker_cfg_text over spalloc.render_*_cfg), byte for byte.
VIRTUAL = WRITTEN_BY + "[Machine]\nversion = 5\nvirtual_board = True\n" + EXTRA
EXPECTED = {
    "virtual": VIRTUAL,
    "session": VIRTUAL,  # no board claimed (yet, or none came): a virtual board
    "machine": WRITTEN_BY + "[Machine]\nversion = 5\nmachine_name = 192.168.240.253\n" + EXTRA,
    "per-run": WRITTEN_BY + "[Machine]\nvirtual_board = False\nmachine_name = None\nversion = 5\n"
    "spalloc_server = https://spalloc.example.org/spalloc/\nspalloc_use_proxy = True\n"
    "spalloc_group = course-a\nspalloc_machine = None\nremote_spinnaker_url = None\n" + EXTRA,
}
CLAIMED = (
    "# SpiNNaker boards claimed by the hub for alice's server: https://spalloc.example.org/spalloc/srv/spalloc/"
    "jobs/7\n" + WRITTEN_BY + "[Machine]\nvirtual_board = False\nmachine_name = 10.11.192.1\nversion = 5\n"
    "spalloc_server = None\nremote_spinnaker_url = None\nauto_detect_bmp = False\n"
    "reset_machine_on_startup = False\nturn_off_machine = False\n" + EXTRA
)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_mode_renders_the_text_kernels_saw_before(mode):
    assert spynnaker_cfg.text({**SPINNAKER, "mode": mode}) == EXPECTED[mode]
    assert spynnaker_cfg.text(SPINNAKER, mode=mode) == EXPECTED[mode]  # another mode than the deployment's


def test_claimed_boards_name_the_board_and_the_job():
    board = ClaimedBoards("10.11.192.1", 5, "https://spalloc.example.org/spalloc/srv/spalloc/jobs/7", "alice", 2)
    assert spynnaker_cfg.text({**SPINNAKER, "mode": "session"}, claimed=board) == CLAIMED
    one = spynnaker_cfg.text(SPINNAKER, claimed=ClaimedBoards("10.0.0.5", 3, "https://s/jobs/8", "bob"))
    assert one.startswith("# SpiNNaker board claimed by the hub for bob's server: https://s/jobs/8\n")
    assert "machine_name = 10.0.0.5\nversion = 3\n" in one


def test_what_spynnaker_reads():
    """sPyNNaker's own parser (a RawConfigParser) reads every mode's file; exactly one machine is selected."""
    for mode in EXPECTED:
        cfg = configparser.RawConfigParser()
        cfg.optionxform = str
        cfg.read_string(spynnaker_cfg.text(SPINNAKER, mode=mode))
        m = cfg["Machine"]
        chosen = [
            m.get("virtual_board") == "True",
            m.get("machine_name", "None") != "None",
            m.get("spalloc_server", "None") != "None",
        ]
        assert chosen.count(True) == 1, (mode, dict(m))
        assert cfg["Reports"]["write_energy_report"] == "False"


def test_extra_cfg_replaces_a_key_in_place_and_adds_sections():
    cfg = spynnaker_cfg.build({**SPINNAKER, "extra_cfg": {"Machine": {"version": 3}, "Mapping": {"a": "b"}}})
    assert list(cfg.sections) == ["Machine", "Mapping"]
    assert list(cfg.sections["Machine"].items()) == [("version", 3), ("virtual_board", True)]


def test_a_percent_sign_is_kept_literally():
    """sPyNNaker reads values raw: a `%` is just a character (configparser's interpolation used to refuse it)."""
    text = spynnaker_cfg.text({**SPINNAKER, "extra_cfg": {"Reports": {"path_template": "run_%d"}}})
    cfg = configparser.RawConfigParser()
    cfg.read_string(text)
    assert cfg["Reports"]["path_template"] == "run_%d"


def test_a_value_on_two_lines_is_refused_naming_the_setting():
    with pytest.raises(CfgError) as e:
        spynnaker_cfg.text({**SPINNAKER, "extra_cfg": {"Reports": {"note": "one\nsection_two = yes"}}})
    assert str(e.value).count("\n") == 0 and "spinnaker.extra_cfg.Reports.note" in str(e.value)


def test_unknown_mode_is_refused():
    with pytest.raises(CfgError, match="spinnaker.mode: 'lab' is not one of"):
        spynnaker_cfg.text(SPINNAKER, mode="lab")


@pytest.mark.parametrize(
    "url, root",
    [
        ("https://spinnaker.cs.man.ac.uk/spalloc", "https://spinnaker.cs.man.ac.uk/spalloc/"),
        ("https://spinnaker.cs.man.ac.uk/spalloc/srv/spalloc/", "https://spinnaker.cs.man.ac.uk/spalloc/"),
        (" http://127.0.0.1:8080/ ", "http://127.0.0.1:8080/"),
    ],
)
def test_spalloc_server_url(url, root):
    assert spynnaker_cfg.spalloc_server(url) == root


def test_spalloc_server_url_must_be_http():
    with pytest.raises(CfgError, match=r"must be an http\(s\) URL .*spinnaker.spalloc.url"):
        spynnaker_cfg.spalloc_server("spinnaker.cs.man.ac.uk:22244")


def _imports(module: str) -> set[str]:
    """Every module `module` (a module or a subpackage) imports from this package, at the top or inside a function."""
    found = set()
    sub = PACKAGE / module  # a subpackage: its modules import this package's from two levels up
    files, level = (sorted(sub.glob("*.py")), 2) if sub.is_dir() else ([PACKAGE / f"{module}.py"], 1)
    for node in (n for f in files for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.level == level:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spinnaker_jupyter."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycle_between_the_cfg_the_kernels_and_spalloc():
    assert _imports("spynnaker_cfg") == set()  # standard library only: the CLI imports it at start-up
    assert "kernels" not in _imports("spalloc") and "spalloc" not in _imports("kernels")
