"""How many boards a user gets: the one rule for servers (the spawner mixin) and batch jobs (jobs/job_boards.py)."""

from collections.abc import Iterable, Mapping


def boards_share(
    user: str, groups: Iterable[str], per_user: Mapping[str, int], per_group: Mapping[str, int], default: int
) -> int:
    """The user's own number if the operator set one, else the largest of their groups' numbers, else the default."""
    if user in per_user:
        return int(per_user[user])
    numbers = [int(per_group[g]) for g in groups if g in per_group]
    return max(numbers) if numbers else int(default)
