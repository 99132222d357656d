"""The uid a new system account takes (uid_range.next_uid) and whether a spawner.local.uid_range suits a machine
(uid_range.uid_range_problem): pure functions over a fake passwd/group list and a fake /etc/login.defs."""

from __future__ import annotations

import pytest

from spinnaker_jupyter import config
from spinnaker_jupyter.config_error import ConfigError
from spinnaker_jupyter.uid_range import (
    DEFAULT_UID_RANGE,
    UidRangeFull,
    next_uid,
    parse_login_defs,
    parse_subid,
    uid_range_problem,
    uids_left,
)

#: Debian 12's /etc/login.defs (the numeric part that matters here).
DEBIAN = parse_login_defs(
    """
# comment UID_MIN 5
UID_MIN			 1000
UID_MAX			60000
#SYS_UID_MIN		  101
#SYS_UID_MAX		  999
SUB_UID_MIN		   100000
SUB_UID_MAX		600100000
SUB_UID_COUNT		    65536
GID_MIN			 1000
GID_MAX			60000
ENCRYPT_METHOD SHA512
"""
)


def test_login_defs_and_subid_files_are_read():
    assert DEBIAN == {
        "UID_MIN": 1000,
        "UID_MAX": 60000,
        "SUB_UID_MIN": 100000,
        "SUB_UID_MAX": 600100000,
        "SUB_UID_COUNT": 65536,
        "GID_MIN": 1000,
        "GID_MAX": 60000,
    }
    assert parse_subid("alice:100000:65536\nbob:165536:65536\n\nbroken\n") == [(100000, 165535), (165536, 231071)]


def test_first_account_takes_the_first_uid_of_the_range():
    passwd = [0, 1, 100, 999, 1000, 65534]  # root, daemons, accounts of an earlier release, a person, nobody
    assert next_uid(passwd, (70000, 70002)) == 70000


def test_the_lowest_free_uid_is_taken_and_a_retired_accounts_uid_is_never_given_again():
    # 70000 retired (its passwd entry stays), 70001 in use, 70002 free, 70003 in use
    assert next_uid([70000, 70001, 70003], (70000, 70005)) == 70002
    # once 70002 is given, the next is above the highest: nothing below is free
    assert next_uid([70000, 70001, 70002, 70003], (70000, 70005)) == 70004


def test_a_uid_whose_gid_another_group_has_is_skipped_so_the_accounts_group_gets_its_uid():
    passwd_uids, group_gids = [70000], [70001]  # a group some other software made
    assert next_uid(passwd_uids + group_gids, (70000, 70005)) == 70002


def test_a_full_range_has_no_uid_and_says_so_in_one_actionable_line():
    assert next_uid([5000, 5001, 5002], (5000, 5002)) is None
    assert uids_left([5000, 5001, 5002], (5000, 5002)) == 0
    assert uids_left([4999, 5001, 5003], (5000, 5002)) == 2
    line = UidRangeFull("jupyter-dora", "dora", (5000, 5002)).message("server")
    assert "\n" not in line
    assert "all 3 uids of spawner.local.uid_range [5000, 5002] are taken" in line
    assert "dora's server cannot start" in line and "larger spawner.local.uid_range" in line


def test_16_bit_minus_one_is_never_given():
    assert next_uid([65534], (65534, 65536)) == 65536
    assert uids_left([], (65530, 65539)) == 9


def test_a_large_range_is_cheap():
    assert next_uid(range(100000), (1, 2**31 - 1)) == 100000
    assert uids_left([], (1, 2**31 - 1)) == 2**31 - 2


def test_the_default_range_suits_a_debian_machine():
    assert uid_range_problem(DEFAULT_UID_RANGE, False, DEBIAN, parse_subid("alice:100000:65536\n")) is None


@pytest.mark.parametrize(
    "uid_range, in_login, wanted",
    [
        ([80000, 80000], False, "the first uid must be smaller than the last"),
        ([90000, 80000], False, "the first uid must be smaller than the last"),
        ([500, 800], False, "reaches into this machine's system uids (up to 999"),
        ([999, 70000], True, "reaches into this machine's system uids (up to 999"),
        ([5000, 9999], False, "overlaps the uids of this machine's login accounts (1000-60000"),
        ([59000, 60500], False, "uid_range_in_login_range: true"),
        ([90000, 120000], False, "overlaps subordinate uids (100000-600100000"),
        ([62000, 63000], False, "systemd's dynamic service users"),
        ([700000000, 700001000], False, "systemd's container uid ranges"),
        ([2000000000, 2**31], False, "uids end at 2147483647"),
    ],
)
def test_a_range_that_does_not_suit_the_machine_is_refused_in_one_line(uid_range, in_login, wanted):
    problem = uid_range_problem(uid_range, in_login, DEBIAN)
    assert problem is not None and wanted in problem, problem
    assert problem.startswith(f"spawner.local.uid_range [{uid_range[0]}, {uid_range[1]}]") and "\n" not in problem


def test_the_operator_may_share_the_login_range():
    assert uid_range_problem([20000, 29999], True, DEBIAN) is None


def test_a_machine_with_a_larger_system_range_or_allocated_subordinate_uids():
    defs = {**DEBIAN, "SYS_UID_MAX": 1999, "UID_MIN": 2000}
    assert "up to 1999" in uid_range_problem([1500, 1800], False, defs)
    no_sub_defaults = {**DEBIAN, "SUB_UID_COUNT": 0, "SUB_GID_COUNT": 0}
    assert uid_range_problem([200000, 299999], False, no_sub_defaults) is None
    problem = uid_range_problem([200000, 299999], False, no_sub_defaults, parse_subid("bob:231072:65536\n"))
    assert "overlaps subordinate uids (231072-296607" in problem


def test_the_config_refuses_a_bad_range_naming_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spawner:\n  local:\n    uid_range: [90000, 80000]\n")
    with pytest.raises(ConfigError, match=r"spawner.local.uid_range \[90000, 80000\]: the first uid must be smaller"):
        config.load([cfg])
    cfg.write_text("spawner:\n  local:\n    uid_range: [70000]\n")
    with pytest.raises(ConfigError, match="uid_range"):
        config.load([cfg])
    cfg.write_text("spawner:\n  local:\n    uid_range: [2100000000, 2100000002]\n")
    assert config.load([cfg])["spawner"]["local"]["uid_range"] == [2100000000, 2100000002]


def test_a_batch_job_of_a_user_without_an_account_fails_with_the_line_when_the_range_is_full(tmp_path):
    from spinnaker_jupyter.jobs.executor import AccountError, LocalExecutor

    executor = LocalExecutor(tmp_path, True, "jupyter-nosuch-", uid_range=[0, 0])  # root's uid: no room left
    with pytest.raises(AccountError, match=r"uid_range \[0, 0\] are taken .* nobody's jobs cannot start"):
        executor.account("nobody")
