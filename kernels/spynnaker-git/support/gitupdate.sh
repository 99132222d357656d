#!/usr/bin/env bash
# Update the git clones of ~/sPyNNakerGit (the "sPyNNakerGit" kernel).
#
# usage: support/gitupdate.sh [BRANCH]
#
# For every repository: fetch from origin, switch to BRANCH when origin has it
# (else to master, or main where there is no master), then fast-forward to
# origin. One line is printed per repository.
#
# Your own work is never overwritten: a repository with uncommitted changes to
# tracked files, a detached HEAD, or local commits that diverge from origin is
# fetched but left as it is and reported as NOT UPDATED. Exit status: 0 when every
# repository was updated or already up to date, 1 when any was not updated.
#
# After an update, rebuild the C code with support/automatic_make.sh.
set -euo pipefail
export LC_ALL=C GIT_TERMINAL_PROMPT=0

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "$0"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) echo "gitupdate: unknown option $1" >&2; usage >&2; exit 2 ;;
esac
if [ "$#" -gt 1 ]; then
    echo "gitupdate: at most one argument (a branch name) is accepted" >&2
    exit 2
fi
BRANCH="${1:-}"
if [ -n "$BRANCH" ] && ! git check-ref-format --branch "$BRANCH" >/dev/null 2>&1; then
    echo "gitupdate: '$BRANCH' is not a valid branch name" >&2
    exit 2
fi

SUPPORT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${SPINNAKER_GIT_ROOT:-$(dirname "$SUPPORT_DIR")}"

# The repositories, in order: support/repos.txt (written at set-up), else every
# git clone directly under ROOT.
REPOS=()
if [ -f "$SUPPORT_DIR/repos.txt" ]; then
    while read -r name _; do
        case "$name" in ''|'#'*) continue ;; esac
        REPOS+=("$name")
    done < "$SUPPORT_DIR/repos.txt"
else
    for d in "$ROOT"/*/; do
        d="${d%/}"
        [ -e "$d/.git" ] && REPOS+=("$(basename "$d")")
    done
fi
if [ "${#REPOS[@]}" -eq 0 ]; then
    echo "gitupdate: no git repositories found in $ROOT" >&2
    exit 1
fi

short() { git rev-parse --short "$1" 2>/dev/null || echo "?"; }
# first line of a command's error output, indented for the report
first_lines() { sed -n '1,3s/^/      /p'; }

n_updated=0; n_current=0; n_skipped=0
width=0
for name in "${REPOS[@]}"; do [ "${#name}" -gt "$width" ] && width=${#name}; done

report() {  # report NAME MESSAGE
    printf '%-*s  %s\n' "$width" "$1" "$2"
}

update_repo() {
    local name="$1" dir="$ROOT/$1" out target note="" cur before after
    if [ ! -d "$dir" ]; then
        report "$name" "NOT UPDATED: $dir does not exist"; n_skipped=$((n_skipped + 1)); return
    fi
    if ! git -C "$dir" rev-parse --git-dir >/dev/null 2>&1; then
        report "$name" "NOT UPDATED: not a git repository"; n_skipped=$((n_skipped + 1)); return
    fi
    cd "$dir"
    if ! out=$(git fetch --prune --quiet origin 2>&1); then
        report "$name" "NOT UPDATED: fetch from $(git remote get-url origin 2>/dev/null || echo origin) failed"
        printf '%s\n' "$out" | first_lines
        n_skipped=$((n_skipped + 1)); return
    fi
    # which branch to be on
    if [ -n "$BRANCH" ] && git show-ref --verify --quiet "refs/remotes/origin/$BRANCH"; then
        target="$BRANCH"
    else
        if git show-ref --verify --quiet refs/remotes/origin/master; then
            target=master
        elif git show-ref --verify --quiet refs/remotes/origin/main; then
            target=main
        else
            target=$(git symbolic-ref --quiet --short refs/remotes/origin/HEAD 2>/dev/null || true)
            target="${target#origin/}"
        fi
        if [ -z "$target" ]; then
            report "$name" "NOT UPDATED: origin has neither master nor main"
            n_skipped=$((n_skipped + 1)); return
        fi
        [ -n "$BRANCH" ] && note=" (no branch $BRANCH on origin)"
    fi
    cur=$(git symbolic-ref --quiet --short HEAD 2>/dev/null || true)
    before=$(short HEAD)
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
        report "$name" "NOT UPDATED: uncommitted changes on ${cur:-detached HEAD} $before; commit or stash them, then rerun$note"
        n_skipped=$((n_skipped + 1)); return
    fi
    if [ -z "$cur" ]; then
        report "$name" "NOT UPDATED: detached HEAD at $before; 'git switch $target' first$note"
        n_skipped=$((n_skipped + 1)); return
    fi
    local switched=""
    if [ "$cur" != "$target" ]; then
        if git show-ref --verify --quiet "refs/heads/$target"; then
            out=$(git switch --quiet "$target" 2>&1) || {
                report "$name" "NOT UPDATED: could not switch from $cur to $target"
                printf '%s\n' "$out" | first_lines; n_skipped=$((n_skipped + 1)); return; }
        else
            out=$(git switch --quiet --create "$target" --track "origin/$target" 2>&1) || {
                report "$name" "NOT UPDATED: could not switch from $cur to $target"
                printf '%s\n' "$out" | first_lines; n_skipped=$((n_skipped + 1)); return; }
        fi
        switched="switched $cur -> $target, "
    fi
    if ! git merge-base --is-ancestor HEAD "origin/$target"; then
        local ahead
        ahead=$(git rev-list --count "origin/$target..HEAD")
        if git merge-base --is-ancestor "origin/$target" HEAD; then
            report "$name" "${switched}$target $before is $ahead commit(s) ahead of origin/$target; not changed$note"
            n_current=$((n_current + 1)); return
        fi
        report "$name" "NOT UPDATED: ${switched}$target $before has $ahead local commit(s) not on origin/$target (diverged); merge or rebase by hand$note"
        n_skipped=$((n_skipped + 1)); return
    fi
    local behind
    behind=$(git rev-list --count "HEAD..origin/$target")
    if [ "$behind" -eq 0 ]; then
        if [ -n "$switched" ]; then
            report "$name" "${switched}at $before$note"; n_updated=$((n_updated + 1))
        else
            report "$name" "$target $before up to date$note"; n_current=$((n_current + 1))
        fi
        return
    fi
    if ! out=$(git merge --ff-only --quiet "origin/$target" 2>&1); then
        report "$name" "NOT UPDATED: ${switched}fast-forward of $target failed"
        printf '%s\n' "$out" | first_lines; n_skipped=$((n_skipped + 1)); return
    fi
    after=$(short HEAD)
    if ! git diff --quiet "$before" "$after" -- setup.py setup.cfg pyproject.toml 2>/dev/null; then
        note="$note; its packaging changed: reinstall with 'pip install -e $dir'"
    fi
    report "$name" "${switched}$target $before -> $after ($behind new commit(s))$note"
    n_updated=$((n_updated + 1))
}

for name in "${REPOS[@]}"; do
    update_repo "$name"
done

echo "gitupdate: $n_updated updated, $n_current up to date, $n_skipped NOT updated"
if [ "$n_updated" -gt 0 ]; then
    echo "gitupdate: rebuild the C code now: $SUPPORT_DIR/automatic_make.sh"
fi
[ "$n_skipped" -eq 0 ]
