"""Slurm's units: job times ("2-00:00:00", "90m") and memory sizes ("64G"), both ways.

Kept apart from the profiles and the job requests, which both need them, so that neither imports
the other.
"""

from __future__ import annotations

import math
import re

_TIME_RE = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_SUFFIX_RE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<unit>[smhd])$")


def parse_time_minutes(text: str) -> int:
    """Slurm time syntax -> whole minutes (rounded up).

    Accepts what sbatch accepts ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") plus
    "90m", "2h", "1.5h", "2d". "infinite"/"UNLIMITED" are not job times (see partition limits).
    """
    text = str(text).strip()
    suffix = _SUFFIX_RE.match(text)
    if suffix:
        factor = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}[suffix["unit"]]
        minutes = math.ceil(float(suffix["num"]) * factor)
    else:
        match = _TIME_RE.match(text)
        if not match:
            raise ValueError(f"time {text!r}: expected HH:MM:SS, D-HH:MM:SS, MM, or 90m / 2h / 2d")
        days = int(match["days"] or 0)
        parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
        if match["days"] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            hours, mins, secs = (parts + [0, 0])[:3]
        elif len(parts) == 1:  # MM
            hours, mins, secs = 0, parts[0], 0
        elif len(parts) == 2:  # MM:SS
            hours, mins, secs = 0, parts[0], parts[1]
        else:
            hours, mins, secs = parts
        minutes = days * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    if minutes < 1:
        raise ValueError(f"time {text!r}: must be at least one minute")
    return minutes


def parse_partition_limit_minutes(text: str) -> int | None:
    """sinfo's %l (partition MaxTime) -> minutes, or None for no limit."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    return parse_time_minutes(text)


def format_minutes(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


def slurm_mem(gb: float) -> str:
    """GB -> sbatch --mem syntax: whole gigabytes as "64G", else megabytes ("1536M")."""
    return f"{int(gb)}G" if float(gb).is_integer() else f"{math.ceil(gb * 1024)}M"
