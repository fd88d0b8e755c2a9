"""The chain side (mesh402.economics): x402 payments on a dev chain, the ledger, the facilitator, ERC-8004
contracts and identity, spot-check validation on chain, the contract toolchain."""
