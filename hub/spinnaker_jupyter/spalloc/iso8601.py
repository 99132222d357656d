"""ISO-8601 durations and instants as the allocation service writes them (``PT60S``, ``2026-12-02T04:58:00Z``)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any


def parse_iso_duration(text: str) -> float:
    """Seconds in a simple ISO-8601 duration (``PT120S``, ``PT2M``, ``PT1M30.5S``, ``P1DT2H``)."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:[.,]\d+)?)S)?)?", text.strip().upper())
    if not m or not any(m.groups()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    d, h, mi, s = m.groups()
    return int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float((s or "0").replace(",", "."))


def parse_instant(value: Any) -> float | None:
    """Unix time of an instant as the service writes it (ISO-8601 ``2026-12-02T04:58:00.123Z``, or epoch seconds,
    Jackson's default); ``None`` when absent or unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:[.,](\d+))?(.*)", text)
    frac = 0.0
    if m:  # Python before 3.11 reads at most 6 fraction digits; Java writes up to 9
        text, frac = m.group(1) + m.group(3), float("0." + m.group(2)) if m.group(2) else 0.0
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp() + frac


def format_iso_duration(seconds: float) -> str:
    """``PT60S``; fractions are kept (``PT0.5S``), as ``java.time.Duration.parse`` accepts them."""
    if seconds <= 0:
        raise ValueError("a keepalive interval must be positive")
    return f"PT{int(seconds)}S" if float(seconds).is_integer() else f"PT{seconds:.3f}".rstrip("0") + "S"
