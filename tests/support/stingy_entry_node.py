"""Test-only entry point: a `mesh402` node process whose entry stops raising its escrow vouchers after
`$MESH402_STINGY_KEEP` of them (it re-sends the last one; tests/support/work_pay.StingySigner), the hostile
entry of issue 14 test (b). Start it as `python -m tests.support.stingy_entry_node serve ...`; nothing in the
product reads a hook from the environment."""

from __future__ import annotations

import os
from typing import Any

from mesh402.node import escrow_pay
from tests.support.work_pay import StingySigner

_attach = escrow_pay.EscrowPay.attach


def _stingy_attach(self: escrow_pay.EscrowPay, dist: Any) -> None:
    _attach(self, dist)
    dist.voucher_signer = StingySigner(self.issuer, int(os.environ.get("MESH402_STINGY_KEEP", "2")))


escrow_pay.EscrowPay.attach = _stingy_attach  # type: ignore[method-assign]

if __name__ == "__main__":
    from mesh402.cli import main

    main()
