"""Fixtures shared by the end-to-end tests."""

from tests.e2e.security_helpers import groups, sockdir

__all__ = ["groups", "sockdir"]
