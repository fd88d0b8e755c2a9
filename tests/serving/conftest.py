"""Fixtures of the in-process pipeline tests in this folder (module-scoped: one engine per test module). A
module that defines its own fixture of the same name (a `prompt`, an `executor`) uses its own."""

from tests.support.pipeline import executor, solo  # noqa: F401  (fixtures)
from tests.support.pipeline_receipts import prompt  # noqa: F401  (fixture)
