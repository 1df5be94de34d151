"""Small pure helpers of the HTTP layer: Retry-After, Overpass status page, backoff, splits."""

import email.utils
import time

import pytest

from harvester.http import parse_retry_after
from harvester.labels.overpass import seconds_until_slot, status_url
from harvester.splits import split_for, split_of_block
from harvester.worker import backoff_delay

STATUS_FREE = """Connected as: 1234567890
Current time: 2026-11-23T21:00:00Z
Announced endpoint: none
Rate limit: 2
2 slots available now.
Currently running queries (pid, space limit, time limit, start time):
"""
STATUS_BUSY = """Connected as: 1234567890
Current time: 2026-11-23T21:00:00Z
Announced endpoint: none
Rate limit: 2
Slot available after: 2026-11-23T21:00:12Z, in 12 seconds.
Slot available after: 2026-11-23T21:00:40Z, in 40 seconds.
Currently running queries (pid, space limit, time limit, start time):
"""


def test_retry_after_seconds_and_date():
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 18 <= parse_retry_after(future) <= 21


def test_status_page():
    assert seconds_until_slot(STATUS_FREE) == 0
    assert seconds_until_slot(STATUS_BUSY) == 12
    assert seconds_until_slot("<html>gateway</html>") is None
    assert status_url("https://overpass-api.de/api/interpreter") == "https://overpass-api.de/api/status"


def test_backoff_grows_and_honours_retry_after():
    for attempts in range(1, 6):
        d = backoff_delay(attempts, 2.0, None)
        assert 0.5 * 2.0 * 2 ** (attempts - 1) <= d <= 1.5 * 2.0 * 2 ** (attempts - 1)
    assert backoff_delay(1, 2.0, 45.0) == 45.0


def test_splits_are_deterministic_and_about_80_10_10():
    counts = {"train": 0, "val": 0, "test": 0}
    for x in range(100):
        for y in range(100):
            counts[split_of_block(x, y)] += 1
    assert abs(counts["train"] - 8000) < 300 and abs(counts["val"] - 1000) < 200 and abs(counts["test"] - 1000) < 200
    # Every zoom of one place shares the split: it depends on the coordinate's zoom-10 block only.
    assert split_for(2.3522, 48.8566) == split_for(2.3523, 48.8567)


@pytest.mark.parametrize("x, y, split", [(500, 350, "train"), (500, 353, "val"), (500, 354, "test")])
def test_split_regression_examples(x, y, split):
    # Pinned: a change of the hash would silently move samples between train and test in existing databases.
    assert split_of_block(x, y) == split
