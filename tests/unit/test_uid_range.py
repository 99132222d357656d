"""The uid a new system account takes (uid_range.next_uid, above the high-water mark give_uid keeps in data_dir) and
whether a spawner.local.uid_range suits a machine (uid_range.uid_range_problem): pure functions over a fake
passwd/group list and a fake /etc/login.defs; the mark in a temporary data_dir."""

from __future__ import annotations

import grp
import random
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from spinnaker_jupyter import config, uid_range
from spinnaker_jupyter.config_error import ConfigError
from spinnaker_jupyter.uid_range import (
    DEFAULT_UID_RANGE,
    UidRangeFull,
    give_uid,
    high_water,
    mark_file,
    next_uid,
    parse_login_defs,
    parse_subid,
    read_mark,
    taken_ids,
    uid_range_check,
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
    assert "dora's server cannot start" in line and "raises the last uid of spawner.local.uid_range above 5002" in line


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


# ------------------------------------------------------------------------------------------------- the high-water mark
def test_a_uid_freed_below_the_mark_is_never_given_again():
    # 70001 was given and its account deleted by hand (userdel): free on the machine, but below the mark
    assert next_uid([70000, 70002], (70000, 70005), above=70002) == 70003
    assert uids_left([70000, 70002], (70000, 70005), above=70002) == 3
    assert next_uid([70004], (70000, 70005), above=70003) == 70005  # taken uids above the mark are skipped


def test_the_range_is_full_at_the_top_even_with_lower_uids_free():
    assert next_uid([], (5000, 5002), above=5002) is None
    assert uids_left([], (5000, 5002), above=5002) == 0
    assert uids_left([], (5000, 5002), above=9000) == 0  # the range moved below what was given: nothing is left
    line = UidRangeFull("jupyter-dora", "dora", (5000, 5002), mark=9000).message("jobs")
    assert "the highest given is 9000" in line and "raises the last uid of spawner.local.uid_range above 9000" in line
    assert "\n" not in line


def test_a_deployment_without_a_mark_starts_from_the_highest_account_uid_in_the_range():
    assert high_water((70000, 79999), None, [0, 1000, 70000, 70004, 80000]) == 70004  # 80000: not the range's
    assert high_water((70000, 79999), None, [0, 1000]) == 69999  # nothing given yet: from the first uid
    assert high_water((70000, 79999), 70010, [70004]) == 70010  # the mark: above a deleted account's uid
    assert high_water((70000, 79999), 70010, [70020]) == 70020  # an account made by hand above it counts too


def _free_range(size: int) -> tuple[int, int]:
    """`size` uids no account or group of this machine has (far above systemd's container uids)."""
    taken = taken_ids()
    while True:
        lo = random.randrange(1_900_000_000, 2_140_000_000)
        if not taken & set(range(lo, lo + size)):
            return lo, lo + size - 1


def test_give_uid_remembers_the_highest_uid_given_in_data_dir(tmp_path):
    (tmp_path / "hub").mkdir(mode=0o700)
    lo, hi = _free_range(3)
    assert read_mark(mark_file(tmp_path)) is None
    assert give_uid(tmp_path, (lo, hi)) == lo  # no account is made: the next call still gets the next uid
    assert give_uid(tmp_path, (lo, hi)) == lo + 1
    assert read_mark(mark_file(tmp_path)) == lo + 1 and mark_file(tmp_path) == tmp_path / "hub" / "uid-high-water"
    assert stat.S_IMODE(mark_file(tmp_path).stat().st_mode) == 0o644
    mark_file(tmp_path).write_text(f"{hi}\n")  # the mark at the top, lo + 2 never given: the range is full
    assert give_uid(tmp_path, (lo, hi)) is None
    assert read_mark(mark_file(tmp_path)) == hi
    assert not list((tmp_path / "hub").glob("*.tmp"))


def test_a_number_taken_after_the_accounts_were_read_is_not_given(tmp_path, monkeypatch):
    (tmp_path / "hub").mkdir(mode=0o700)
    lo, hi = _free_range(3)
    real = grp.getgrgid

    def getgrgid(number):  # a group made by hand with the range's first number after give_uid read them all
        return real(0) if number == lo else real(number)

    monkeypatch.setattr(uid_range.grp, "getgrgid", getgrgid)
    assert give_uid(tmp_path, (lo, hi)) == lo + 1


def test_the_hub_and_the_job_service_never_pick_one_uid(tmp_path):
    (tmp_path / "hub").mkdir(mode=0o700)
    uid_range = _free_range(40)
    with ThreadPoolExecutor(8) as pool:  # each call opens and flocks the lock file as another process would
        given = list(pool.map(lambda _i: give_uid(tmp_path, uid_range), range(30)))
    assert sorted(given) == list(range(uid_range[0], uid_range[0] + 30))


def test_a_data_dir_without_its_hub_folder_makes_no_account(tmp_path):
    with pytest.raises(RuntimeError, match=r"/hub \(data_dir/hub, .*\) does not exist, so no account is made"):
        give_uid(tmp_path, _free_range(3))


def test_a_spoilt_mark_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "hub").mkdir()
    mark_file(tmp_path).write_text("seventy\n")
    with pytest.raises(RuntimeError, match=r"uid-high-water should hold one number.*write that uid into it"):
        give_uid(tmp_path, _free_range(3))


def test_check_says_full_as_a_failure_and_few_left_as_a_warning(tmp_path):
    (tmp_path / "hub").mkdir()
    lo, hi = _free_range(200)
    assert uid_range_check((lo, hi), tmp_path) is None
    mark_file(tmp_path).write_text(f"{hi - 50}\n")
    ok, line = uid_range_check((lo, hi), tmp_path)
    assert ok and f"only 50 of the 200 uids of spawner.local.uid_range [{lo}, {hi}]" in line
    mark_file(tmp_path).write_text(f"{hi}\n")
    ok, line = uid_range_check((lo, hi), tmp_path)
    assert not ok and "\n" not in line
    assert (
        f"no uid is left in spawner.local.uid_range [{lo}, {hi}]" in line
        and f"the highest uid ever given is {hi}" in line
    )
