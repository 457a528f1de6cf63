"""Fixtures for tests/models live in models_support.py (a unique module name: every test directory has a conftest)."""

from models_support import *  # noqa: F401,F403
