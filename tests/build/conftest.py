"""Fixtures for tests/build live in build_support.py (a unique module name: every test directory has a conftest)."""

from build_support import *  # noqa: F401,F403
