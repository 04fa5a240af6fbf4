"""Number and message formatting shared by the summaries (accounting), the run report and errors; no torch import."""

from __future__ import annotations


def si(n: float) -> str:
    """Compact number: 1.2K, 3.4M, 5.6G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def size_change(reference: float, now: float) -> str:
    """'12.3% smaller', '0.8% larger' or 'unchanged': a size against its reference, in words (no sign to misread)."""
    if not reference:
        return "-"
    ratio = now / reference - 1.0
    if abs(ratio) < 5e-4:
        return "unchanged"
    return f"{abs(ratio):.1%} {'smaller' if ratio < 0 else 'larger'}"


def first_line(exc: BaseException) -> str:
    """The line of an exception's message worth quoting: torch's WeightsUnpickler line, else the first (200 chars)."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
