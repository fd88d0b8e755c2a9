"""Test-only entry point: a `mesh402` node process whose quorum validator votes "fail" on every check it is
drawn for, whatever its re-execution shows (a dishonest validator). The quorum tests start it as
`python -m tests.support.dishonest_validator_node serve ...` instead of `python -m mesh402.cli serve ...`;
nothing in the product reads a hook from the environment."""

from __future__ import annotations

from typing import Any

from mesh402.serving import quorum_votes


def _always_fail(self: quorum_votes.QuorumVoter, checks: list[Any]) -> bool:
    return True


quorum_votes.QuorumVoter.decide = _always_fail  # type: ignore[method-assign]

if __name__ == "__main__":
    from mesh402.cli import main

    main()
