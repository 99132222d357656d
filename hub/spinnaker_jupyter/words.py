"""Figures said in words on pages, spawn messages and logs (one wording everywhere)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """A duration as people say it: `45 s`, `10 min`, `2 min 05 s`, `1 h 30 min` (whole seconds, rounded down)."""
    s = int(seconds)
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min" + (f" {s % 60:02d} s" if s % 60 else "")
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
