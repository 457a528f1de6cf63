"""Fixtures for tests/structured live in structured_support.py (a unique module name: every test directory has a conftest)."""

from structured_support import *  # noqa: F401,F403
