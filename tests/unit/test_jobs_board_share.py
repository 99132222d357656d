"""How many boards a batch job gets and may ask for (hardware_config.boards): the user's share as for their server."""

from __future__ import annotations

import pytest

from spinnaker_jupyter.config import merge
from spinnaker_jupyter.jobs import hardware_config
from spinnaker_jupyter.jobs.job_boards import boards_for, max_boards
from spinnaker_jupyter.schema import SCHEMA, defaults


def spinnaker(mode: str = "session") -> dict:
    return merge(
        defaults(SCHEMA["properties"]["spinnaker"]),
        {"mode": mode, "spalloc": {"boards": 1, "boards_per_user": {"ann": 3}, "boards_per_group": {"lab": 2}}},
    )


def test_the_share_follows_user_then_group_then_default():
    sp = spinnaker()
    assert [boards_for(sp, "ann"), boards_for(sp, "ben", ["lab"]), boards_for(sp, "cat")] == [3, 2, 1]
    assert [max_boards(sp, "ann"), max_boards(sp, "ben", ["lab"]), max_boards(sp, "cat"), max_boards(sp)] == [
        3,
        2,
        1,
        3,
    ]
    assert max_boards(spinnaker("machine"), "ann") == 1 and max_boards(spinnaker("virtual")) == 1


@pytest.mark.parametrize(
    "user, groups, asked, ok",
    [("ann", [], 3, True), ("ben", ["lab"], 3, False), ("cat", [], 2, False), ("cat", [], 1, True)],
)
def test_a_job_asks_for_at_most_its_share(user, groups, asked, ok):
    def parse():
        return hardware_config.parse({"boards": asked}, ["boards"], [], [], 60, max_boards(spinnaker(), user, groups))

    if ok:
        assert parse() == {"boards": asked}
    else:
        with pytest.raises(
            hardware_config.HardwareConfigError,
            match=rf"hardware_config.boards: must be between 1 "
            rf"and {boards_for(spinnaker(), user, groups)}",
        ):
            parse()
