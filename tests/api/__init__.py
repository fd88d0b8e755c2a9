"""The HTTP edge (mesh402.api): the OpenAI-compatible API, the tunnel's boundary checks, the x402 edge (402
answers, paid streams, paid proxying) and the management API."""
