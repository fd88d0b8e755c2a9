"""The test harness's process helpers."""
from harness.procs import free_port


def test_free_port_never_names_a_port_twice():
    """The kernel offers freed ports again (2,000 binds to port 0 gave ~120 repeats here); a node given one
    port for its API and its console fails to start."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
