"""x402 at the HTTP edge: 402 answers, paid streaming, paid proxying of routed requests."""
