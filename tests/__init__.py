"""The test suite. A package, so its folders are packages too: pytest imports each test module by its dotted
name (tests.engine.test_core), same-named files in two folders do not clash, and the repository root (where
`harness` lives) is on sys.path under plain `pytest` as well as `python -m pytest`."""
