"""Several real node processes serving a model together on loopback: pipeline splits, replicas, routing,
expert parallelism, hostile members, and the same paid (a local dev chain). Slow: each starts processes."""
