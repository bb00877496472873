"""Helpers behind the shared fixtures of tests/conftest.py.

Only conftest.py imports these modules; test modules get what they need as fixtures, so no test
module depends on another one.
"""
