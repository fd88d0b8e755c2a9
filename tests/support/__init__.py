"""Helpers and fixtures for the tests, never tests themselves. Test modules import from here and from
`harness` (what benchmarks share), never from another test module. Fixture modules are registered by
tests/conftest.py (`pytest_plugins`) or, for one folder's fixtures, by that folder's conftest.py."""
