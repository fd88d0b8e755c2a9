"""Fixtures of the multi-node scenarios in this folder."""

from tests.support.moe_mesh import moe_model  # noqa: F401  (fixture: the tiny chat MoE, one per module)
from tests.support.paid_mesh import paid_host_mesh  # noqa: F401  (fixture: a host that sells, and entries, one per module)
