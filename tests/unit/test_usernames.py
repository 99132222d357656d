"""Unit tests of spinnaker_jupyter.usernames: identity-provider name -> safe hub user name, and the other user-name
rules kept there (local accounts, names in the deployment config, system accounts and whose they are)."""

import itertools
import os
import pwd
import re

import jsonschema
import pytest

from spinnaker_jupyter.local_accounts import (
    AccountError,
    AccountStore,
)  # (its import runs ldconfig: JupyterHub's pamela)
from spinnaker_jupyter.usernames import (
    HASH_LENGTH,
    MAX_LENGTH,
    MIN_MAX_LENGTH,
    AccountOfAnotherDeployment,
    is_canonical,
    is_safe_username,
    local_name_problem,
    name_hash,
    normalize_username,
    own_system_account,
    system_account_name,
    username_from_claims,
)

SAFE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
SUFFIX = re.compile(rf"--[a-z2-7]{{{HASH_LENGTH}}}$")

HOSTILE = [
    "../etc",
    "..",
    ".",
    "/",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "\x00",
    "Alice",
    "ALICE",
    "aLiCe",
    "a b",
    " alice",
    "alice ",
    "a\tb",
    "a\nb",
    "ünïcode",
    "unïcode",
    "Straße",
    "ＡＢＣ",  # full-width letters (NFKC -> ABC)
    "ﬁle",  # ligature (NFKC -> file)
    "日本語",
    "😀",
    "x" * 300,
    "X" * 300,
    "-rf",
    "--help",
    "-",
    "...",
    "_",
    "a--b",
    "alice--" + "a" * HASH_LENGTH,
    "$(reboot)",
    "`id`",
    "a;rm -rf ~",
    "name:tag",
    "a@b.c",
    "user%2Fname",
    "\ud800",  # lone surrogate, as JSON can produce
    "a" * (MAX_LENGTH + 1),
]


def test_canonical_names_are_kept():
    for name in ["alice", "bob42", "a", "0", "j.doe", "j_doe", "j-doe", "a..b", "a" * MAX_LENGTH]:
        assert normalize_username(name) == name
        assert is_canonical(name)


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:40])
def test_hostile_names_become_safe(name):
    result = normalize_username(name)
    assert isinstance(result, str)
    assert 0 < len(result) <= MAX_LENGTH
    assert SAFE.fullmatch(result), result
    assert result.isascii()
    assert result not in (".", "..")
    assert "/" not in result and "\x00" not in result and "\\" not in result
    assert is_safe_username(result)
    # every one of these had to change, so it carries the hash of the original
    assert SUFFIX.search(result), result
    assert result.endswith(name_hash(name))
    assert not is_canonical(result)


@pytest.mark.parametrize("name", HOSTILE + ["alice", "bob"], ids=lambda n: repr(n)[:40])
def test_stable(name):
    assert normalize_username(name) == normalize_username(name)


def test_no_collisions_between_different_names():
    names = HOSTILE + [
        "alice",
        "bob",
        "a-b",
        "a_b",
        "a.b",
        "ab",
        "unicode",
        "etc",
        "rf",
        "x" * MAX_LENGTH,
        "x" * 299,
        "x" * 301,
        "abc",
        "file",
        "strasse",
        "u",
    ]
    names += [normalize_username(n) for n in list(names)]  # results fed back in are names too
    names = list(dict.fromkeys(names))
    results = {}
    for name in names:
        result = normalize_username(name)
        assert result not in results, f"{name!r} and {results[result]!r} both -> {result}"
        results[result] = name


def test_alike_names_differ():
    alike = ["Alice", "ALICE", "aLiCe", "alice ", " alice", "alicé"]
    results = [normalize_username(n) for n in alike]
    assert len(set(results)) == len(alike)
    assert normalize_username("alice") == "alice"
    assert all(r.startswith("alice--") for r in results)


def test_readable_part():
    assert normalize_username("Alice").startswith("alice--")
    assert normalize_username("a b").startswith("a-b--")
    assert normalize_username("../etc").startswith("etc--")
    assert normalize_username("ünïcode").startswith("unicode--")
    assert normalize_username("-rf").startswith("rf--")
    assert normalize_username("a/b").startswith("a-b--")
    assert normalize_username("a\x00b").startswith("a-b--")
    assert normalize_username("ＡＢＣ").startswith("abc--")
    assert normalize_username("Straße").startswith("strasse--")
    assert normalize_username("...").startswith("u--")
    assert normalize_username("日本語").startswith("u--")
    long = normalize_username("x" * 300)
    assert len(long) == MAX_LENGTH
    assert long.startswith("x" * (MAX_LENGTH - 2 - HASH_LENGTH) + "--")


def test_empty_and_wrong_types():
    with pytest.raises(ValueError):
        normalize_username("")
    for bad in (None, b"alice", 42, ["alice"]):
        with pytest.raises(TypeError):
            normalize_username(bad)


def test_max_length():
    assert len(normalize_username("Alice" * 20, max_length=MIN_MAX_LENGTH)) <= MIN_MAX_LENGTH
    assert normalize_username("a" * 40, max_length=64) == "a" * 40
    assert normalize_username("a" * 40) != "a" * 40
    with pytest.raises(ValueError):
        normalize_username("alice", max_length=MIN_MAX_LENGTH - 1)


def test_results_are_usable_as_path_and_container_names(tmp_path):
    container = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")  # Docker / podman container and volume names
    for name in HOSTILE:
        result = normalize_username(name)
        path = tmp_path / result
        path.mkdir()
        assert path.resolve().parent == tmp_path.resolve()
        assert container.fullmatch("jupyter-" + result)
        assert os.sep not in result


def test_is_safe_username():
    assert is_safe_username("alice")
    assert is_safe_username(normalize_username("Alice"))
    for bad in ["", ".", "..", "-a", "a-", "A", "a b", "a/b", "é", "a" * (MAX_LENGTH + 1), None]:
        assert not is_safe_username(bad)


def test_username_from_claims():
    assert username_from_claims({"preferred_username": "jdoe", "sub": "x"}) == "jdoe"
    assert username_from_claims({"preferred_username": "J Doe"}).startswith("j-doe--")
    assert username_from_claims({"email": "a@b"}, claim="email").startswith("a-b--")
    for info in ({}, {"preferred_username": ""}, {"preferred_username": None}, {"preferred_username": 3}):
        with pytest.raises(ValueError):
            username_from_claims(info)


def test_exhaustive_short_names_are_injective():
    # every string of length <= 2 over a small hostile alphabet: no two share a result
    alphabet = ["a", "A", "-", ".", "_", "/", " ", "\x00", "é", "1"]
    seen = {}
    for n in range(1, 3):
        for chars in itertools.product(alphabet, repeat=n):
            name = "".join(chars)
            result = normalize_username(name)
            assert is_safe_username(result)
            assert seen.setdefault(result, name) == name


# --- the other user-name rules, one module ----------------------------------------------------------------------
LOCAL_OK = ["a", "alice", "bob-1", "x_y", "a" * 24, "z9"]
LOCAL_BAD = ["", "1abc", "Alice", "a.b", "a b", "a" * 25, "-a", "_a", "ünï", "alice\n", "alice\r\n", None]


def test_local_account_names(tmp_path):
    for name in LOCAL_OK:
        assert local_name_problem(name) is None, name
    for name in LOCAL_BAD:
        assert "not a valid account name" in local_name_problem(name), name
    store = AccountStore(tmp_path / "accounts.json")
    # `user add` refuses a name with a line break: it is not `alice` (the old check let `alice\n` through)
    with pytest.raises(AccountError, match=r"'alice\\n' is not a valid account name: use 1-24 lower-case"):
        store.add("alice\n", password="correct horse battery staple 9")
    assert store.names() == {}


def test_every_local_name_is_its_own_system_account_with_the_default_prefix():
    for name in LOCAL_OK:
        assert system_account_name("jupyter-", name) == "jupyter-" + name


def test_system_account_names_fit_linux():
    names = [
        "alice",
        "neuro.scientist--q4xug6lpy5",
        "neuro_scientist--q4xug6lpy5",
        "a" * 40,
        "a" * 41,
        normalize_username("Ünïcode Person"),
    ]
    accounts = [system_account_name("jupyter-", n) for n in names]
    assert len(set(accounts)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9_-]{1,32}", a) for a in accounts), accounts
    assert system_account_name("jupyter-", "a" * 40) == system_account_name("jupyter-", "a" * 40)  # stable


def test_config_user_names():
    """hub.admin_users / auth.local.admin accept every name a login can produce, and nothing with a line break."""
    from spinnaker_jupyter.schema import SCHEMA

    items = SCHEMA["properties"]["hub"]["properties"]["admin_users"]["items"]
    admin = SCHEMA["properties"]["auth"]["properties"]["local"]["properties"]["admin"]
    for name in LOCAL_OK + [normalize_username(n) for n in HOSTILE]:
        jsonschema.validate(name, items)
        jsonschema.validate(name, admin)
    for bad in ["", "Alice", "-a", "a b", "a/b", "a" * 65, "alice\n", "admin\n"]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, items)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, admin)


def _account(home, gecos="Jupyter user alice", uid=None):
    uid = uid if uid is not None else _unused_uid()
    return pwd.struct_passwd(("jupyter-alice", "x", uid, uid, gecos, str(home), "/bin/bash"))


def _unused_uid():
    used = {p.pw_uid for p in pwd.getpwall()}
    return next(u for u in range(61000, 65000) if u not in used)


def test_the_account_of_this_deployment_is_used(tmp_path):
    home = tmp_path / "homes" / "alice"
    pw = _account(home)
    assert own_system_account(pw, home, "alice") is pw
    # through a symlinked path too
    (tmp_path / "link").symlink_to(tmp_path / "homes")
    assert own_system_account(pw, tmp_path / "link" / "alice", "alice") is pw


def test_an_account_of_another_deployment_is_refused(tmp_path):
    other_home, home = tmp_path / "other" / "alice", tmp_path / "homes" / "alice"
    other_home.mkdir(parents=True)  # the other deployment is still there
    with pytest.raises(AccountOfAnotherDeployment) as refused:
        own_system_account(_account(other_home), home, "alice")
    for what in ("server", "jobs"):
        message = refused.value.message(what)
        assert message.startswith("The system account jupyter-alice belongs to another deployment on this machine")
        assert f"alice's {what} will not run as it" in message
        assert "spinnaker_jupyter" not in message and "spawner.local.system_user_prefix" in message
        assert f"usermod --home {home} jupyter-alice" in message


def test_an_account_other_software_made_is_never_taken_over(tmp_path):
    """Home gone and nothing running as it, but not made by a deployment (another comment): refused, not moved."""
    gone, home = tmp_path / "gone", tmp_path / "homes" / "alice"
    with pytest.raises(AccountOfAnotherDeployment):
        own_system_account(_account(gone, gecos="Alice Example"), home, "alice")


# --- whose an account is when its home folder never exists (container servers: the home is a volume) ------------
def _no_usermod(monkeypatch):
    import spinnaker_jupyter.usernames as usernames

    monkeypatch.setattr(usernames.subprocess, "run", lambda *a, **k: pytest.fail(f"account changed: {a}"))


def test_a_container_deployments_own_account_is_used_though_its_home_never_exists(tmp_path, monkeypatch):
    _no_usermod(monkeypatch)
    (tmp_path / "homes").mkdir()
    home = tmp_path / "homes" / "alice"  # never made: the user's home is a volume
    pw = _account(home)
    assert own_system_account(pw, home, "alice") is pw


def test_an_account_of_a_running_container_deployment_is_not_taken_over(tmp_path, monkeypatch):
    """Another deployment with the same prefix, its homes_dir there but the user's home never made (containers),
    nothing running as the account (the server stopped): still that deployment's, refused, unchanged."""
    _no_usermod(monkeypatch)
    (tmp_path / "other" / "homes").mkdir(parents=True)
    theirs = _account(tmp_path / "other" / "homes" / "alice")
    with pytest.raises(AccountOfAnotherDeployment, match="belongs to another deployment"):
        own_system_account(theirs, tmp_path / "ours" / "homes" / "alice", "alice")


def test_an_account_whose_homes_folder_is_a_dangling_link_is_not_taken_over(tmp_path, monkeypatch):
    """(Storage not mounted: the deployment may still be there.)"""
    _no_usermod(monkeypatch)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "homes").symlink_to(tmp_path / "unmounted")
    with pytest.raises(AccountOfAnotherDeployment):
        own_system_account(_account(tmp_path / "other" / "homes" / "alice"), tmp_path / "homes" / "alice", "alice")


def test_an_account_of_a_removed_deployment_is_taken_over(tmp_path, monkeypatch, caplog):
    import logging

    import spinnaker_jupyter.usernames as usernames

    home = tmp_path / "ours" / "homes" / "alice"
    left = _account(tmp_path / "deleted" / "homes" / "alice")  # that deployment's data_dir is gone
    moved = pwd.struct_passwd((*left[:5], str(home), left[6]))
    ran = []

    def usermod(argv, **kw):
        ran.append(argv)
        return usernames.subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(usernames.subprocess, "run", usermod)
    monkeypatch.setattr(usernames.pwd, "getpwnam", lambda name: moved)
    with caplog.at_level(logging.WARNING):
        assert own_system_account(left, home, "alice", logging.getLogger("test-takeover")) is moved
    assert ran == [["usermod", "--home", str(home), "jupyter-alice"]]
    assert "Took over the system account jupyter-alice left by a removed deployment" in caplog.text
