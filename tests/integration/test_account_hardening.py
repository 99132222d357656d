"""A new person under a removed person's name starts with nothing of theirs (local accounts, system accounts as
root): not their home, and not their uid, so nothing the old account left outside the home (here a file in /tmp,
private to its owner) becomes the new person's."""

from __future__ import annotations

import pwd

import pytest


@pytest.fixture(scope="module")
def hub(hub_factory):
    return hub_factory({"culler": {"enabled": False}})


def run(client, code: str) -> str:
    out = client.execute(client.start_kernel(), code, timeout=120)
    assert out["error"] is None, out
    return out["stdout"]


def test_a_re_added_name_gets_a_fresh_uid_and_none_of_the_old_files(hub):
    old = hub.client("hana", hub.add_user("hana"))
    old.start_server()
    said = run(
        old,
        "import os\nopen('/tmp/hana-private', 'w').write('old hana')\nos.chmod('/tmp/hana-private', 0o600)"
        "\nprint('UID', os.getuid())",
    )
    old_uid = int(said.split("UID")[1])
    try:
        removed = hub.cli("user", "remove", "hana")
        assert removed.returncode == 0, removed.stderr
        assert f"retired as retired-{old_uid}" in removed.stdout, removed.stdout
        assert pwd.getpwuid(old_uid).pw_shell == "/usr/sbin/nologin"  # the uid stays taken: never given again

        new = hub.client("hana", hub.add_user("hana"))
        new.start_server()
        said = run(
            new,
            "import os\nprint('UID', os.getuid())\ntry:\n    print(open('/tmp/hana-private').read())\n"
            "except PermissionError:\n    print('DENIED')",
        )
        assert int(said.split("UID")[1].split()[0]) != old_uid, said
        assert "DENIED" in said and "old hana" not in said, said
        new.stop_server()
    finally:
        import os

        os.unlink("/tmp/hana-private")


@pytest.mark.containers
def test_a_name_whose_earlier_home_volume_is_kept_is_not_given_to_a_new_person(hub_factory, podman_engine):
    from podman_fixtures import TEST_LABEL

    prefix = "spinnaker-jupyter-test-home-"
    docker_hub = hub_factory(
        {
            "spawner": {
                "type": "docker",
                "docker": {
                    "engine_url": podman_engine.url,
                    "image": podman_engine.images["singleuser"],
                    "pull_policy": "never",
                    "network": "host",
                    "volume_prefix": prefix,
                    "labels": {TEST_LABEL: "1"},
                },
            }
        },
        start=False,
    )
    podman_engine.client().volumes.create(name=prefix + "ivy", labels={TEST_LABEL: "1"})  # a removed ivy's home
    refused = docker_hub.cli("user", "add", "ivy")
    assert refused.returncode != 0 and "Created account" not in refused.stdout, refused.stdout
    assert f"the home volume {prefix}ivy of an earlier account ivy exists" in refused.stderr, refused.stderr
    assert "`spinnaker-jupyter volumes remove ivy`" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert docker_hub.cli("volumes", "remove", "ivy").returncode == 0
    added = docker_hub.cli("user", "add", "ivy")
    assert added.returncode == 0 and "Created account ivy" in added.stdout, added.stderr


def test_a_re_added_name_does_not_get_the_earlier_persons_batch_jobs(hub_factory):
    from spinnaker_jupyter.config import load
    from spinnaker_jupyter.jobs.settings import db_url
    from spinnaker_jupyter.jobs.store import Store

    d = hub_factory({"culler": {"enabled": False}}, start=False)
    assert d.cli("user", "add", "jo").returncode == 0
    from spinnaker_jupyter.jobs.settings import jobs_dir

    deployment = load([d.config_file])
    jobs_dir(deployment).mkdir(parents=True, exist_ok=True)  # as the job service leaves it
    store = Store(db_url(deployment))
    job = store.create(
        "jo", {"collab": "private-jo", "code": "print(1)", "command": "x", "hardware_platform": "SpiNNaker"}
    )
    store.finish(job.id, "finished", {}, [{"path": "results.txt", "size": 3}], None)  # the old jo's outputs
    assert d.cli("user", "remove", "jo").returncode == 0
    added = d.cli("user", "add", "jo")
    assert added.returncode == 0, added.stderr
    assert store.query("jo") == []  # the new jo lists no job, and the job API refuses the old one (not theirs)
    assert store.get(job.id).user_id.startswith(".removed/jo/")  # kept for operators (`jobs list`)


def test_an_account_left_by_an_earlier_removal_is_retired_when_the_name_is_added_again(hub):
    from spinnaker_jupyter.config import load
    from spinnaker_jupyter.local_accounts import AccountStore

    old = hub.client("kim", hub.add_user("kim"))
    old.start_server()
    old_uid = int(run(old, "import os\nprint('UID', os.getuid())").split("UID")[1])
    old.stop_server()
    d = load([hub.config_file])
    AccountStore(d.accounts_file).remove("kim")  # a removal of before: the account file only, the system account kept
    (d.homes_dir / "kim").rename(d.homes_dir / "kim-old")
    new = hub.client("kim", hub.add_user("kim"))
    new.start_server()
    assert int(run(new, "import os\nprint('UID', os.getuid())").split("UID")[1]) != old_uid
    assert pwd.getpwuid(old_uid).pw_name == f"retired-{old_uid}"
    new.stop_server()
