"""The cluster lab's fixtures: `history` (a fresh History, written to the test's temporary
directory as history.jsonl whatever happens, so that a failed run leaves it as an artifact)."""

from __future__ import annotations

import pytest

from clusterlab import History


@pytest.fixture
def history(tmp_path):
    h = History()
    yield h
    h.dump(tmp_path / "history.jsonl")
    print(f"history: {tmp_path / 'history.jsonl'} ({len(h.events)} events)")
