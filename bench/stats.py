"""Statistics shared by bench/report.py and bench/durable_report.py."""

import statistics


def med(values):
    """The median of the values that are not None, or None."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values):
    """(min, max) of the values that are not None, or (None, None)."""
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (None, None)
