"""Under `make test` a missing real service fails the suite instead of skipping the tests that need it."""

import pytest
from infra import REQUIRE_ENV, skip_or_fail


def test_missing_service_skips_outside_make_test(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no slurmd"):
        skip_or_fail("no slurmd")


def test_missing_service_fails_under_make_test(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no slurmd.*make test"):
        skip_or_fail("no slurmd")
