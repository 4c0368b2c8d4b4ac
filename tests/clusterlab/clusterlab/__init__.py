"""The cluster lab: clients that log their history, and a checker that reads the histories
afterwards (see ../README.md)."""

from .checker import Report, check
from .history import History
from .workload import Publisher, Subscriber, healthy, quiesce, run

__all__ = ["History", "Publisher", "Report", "Subscriber", "check", "healthy", "quiesce", "run"]
