"""The e2e stack's log check (tests/conftest.py) sees every error and nothing else: an ERROR or
CRITICAL line with its traceback, Celery's own ERROR lines, a bare traceback; not the traceback
Django attaches to a 403's WARNING, nor lines from before the test."""

from tests.support.stack import Stack

LOG = """2026-12-01 10:00:00,000 ERROR x: before the test
2026-12-01 10:00:00,000 INFO x: fine
2026-12-01 10:00:00,000 WARNING django.request: Forbidden (Permission denied): /users/
Traceback (most recent call last):
  File "x", line 1
PermissionDenied: no
127.0.0.1:1 - - [01/Dec/2026:10:23:15] "GET /" 200 1
2026-12-01 10:00:01,000 ERROR daphne.server: Exception inside application: boom
Traceback (most recent call last):
  File "y", line 2
ValueError: boom
127.0.0.1:1 - - [01/Dec/2026:10:23:15] "GET /" 200 1
Traceback (most recent call last):
  File "z", line 3
RuntimeError: bare
[2026-12-01 10:00:02,000: ERROR/MainProcess] celery thing
2026-12-01 10:00:03,000 CRITICAL a: b
"""


def test_it_finds_each_error_with_its_traceback(tmp_path):
    log = tmp_path / "web.log"
    log.write_text(LOG)
    start = len(LOG.splitlines(keepends=True)[0])
    found = Stack.errors_since(Stack.__new__(Stack), {log: start})
    assert found == [
        "web: 2026-12-01 10:00:01,000 ERROR daphne.server: Exception inside application: boom\n"
        'Traceback (most recent call last):\n  File "y", line 2\nValueError: boom',
        'web: Traceback (most recent call last):\n  File "z", line 3\nRuntimeError: bare',
        "web: [2026-12-01 10:00:02,000: ERROR/MainProcess] celery thing",
        "web: 2026-12-01 10:00:03,000 CRITICAL a: b",
    ]
