"""Fixtures shared by tests/ and the plugins' own tests."""

pytest_plugins = ["tests.support"]
