"""Admission by EBRAINS collab: the `roles.team` claim, read as the EBRAINS job queue reads it.

EBRAINS IAM lists a user's collab memberships in the userinfo claim `roles.team`, one entry per collab:
`collab-<collab name>-<role>`, the role being viewer, editor or administrator. Collab names may hold hyphens, so
the role is the last part and the name everything between `collab-` and it. A higher role includes the lower ones
(an administrator may do what an editor may, an editor what a viewer may).

The authenticator (ebrains.EBRAINSAuthenticator) turns the memberships that matter to this deployment into hub
groups named like the claim's entries, one per role satisfied (an editor of x is in `collab-x-viewer` and
`collab-x-editor`), and oauthenticator's own `allowed_groups` / `admin_groups` do the rest.
"""

from __future__ import annotations

ROLES = ("viewer", "editor", "administrator")  # each includes the ones before it


def group_name(collab: str, role: str) -> str:
    """The hub group of those who hold at least `role` in `collab` (spelt like the claim's entry)."""
    return f"collab-{collab}-{role}"


def parse_team_entry(entry) -> tuple[str, str] | None:
    """`collab-<name>-<role>` -> (name, role); None for anything else (other team kinds, unknown roles)."""
    if not isinstance(entry, str) or not entry.startswith("collab-"):
        return None
    name, sep, role = entry[len("collab-") :].rpartition("-")
    return (name, role) if sep and name and role in ROLES else None


def memberships(team) -> dict[str, str]:
    """collab -> the highest role held, from the `roles.team` claim (a malformed claim gives none)."""
    held: dict[str, str] = {}
    if not isinstance(team, (list, tuple, set)):
        return held
    for entry in team:
        parsed = parse_team_entry(entry)
        if parsed:
            name, role = parsed
            if name not in held or ROLES.index(role) > ROLES.index(held[name]):
                held[name] = role
    return held


def satisfies(held: str, required: str) -> bool:
    return ROLES.index(held) >= ROLES.index(required)


def groups_for(team, collabs) -> set[str]:
    """The hub groups of a user with this `roles.team` claim, for the collabs the deployment names."""
    held = memberships(team)
    return {group_name(c, r) for c in collabs if c in held for r in ROLES if satisfies(held[c], r)}


def required_groups(required: dict[str, str]) -> set[str]:
    """{collab: minimum role} -> the hub groups whose members qualify."""
    return {group_name(c, r) for c, r in required.items()}


def config_problem(eb: dict) -> str | None:
    """One line naming the key and the fix when a collab setting cannot be what the operator meant."""
    for key in ("allowed_collabs", "admin_collabs"):
        for collab, role in eb.get(key, {}).items():
            parsed = parse_team_entry(collab)
            if parsed:  # the claim's entry given instead of the collab's name
                return (
                    f"auth.ebrains.{key}: '{collab}' looks like a roles.team entry; give the collab's name and "
                    f"the role it needs, e.g. {parsed[0]}: {parsed[1]}"
                )
            if role not in ROLES:
                return f"auth.ebrains.{key}.{collab}: expected one of {', '.join(ROLES)}, got {role!r}"
    return None
