"""What every unit test shares: a clean list of known passwords.

jobs/config.py remembers each password it parses (``_SECRETS``) so that ``redact`` can scrub
it from any message leaving the process. Within one test process that list would outlive the
test that put a password in it, and an unrelated test's text containing the same word (a
table named ``secrets``, say) would come out redacted depending on which tests ran before it
in that process (pytest-xdist hands modules to processes in no fixed order).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from jobs import config


@pytest.fixture(autouse=True)
def _known_passwords_stay_with_their_test() -> Iterator[None]:
    before = set(config._SECRETS)
    yield
    config._SECRETS.clear()
    config._SECRETS.update(before)
