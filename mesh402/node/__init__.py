"""The running node: its models, API, mesh runtime and background jobs (payouts), wired together."""
