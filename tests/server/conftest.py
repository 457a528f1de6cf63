"""Fixtures for tests/server live in server_support.py (a unique module name: every test directory has a conftest)."""

from server_support import *  # noqa: F401,F403
