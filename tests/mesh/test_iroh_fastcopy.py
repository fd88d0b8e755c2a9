"""The iroh per-byte-copy fix: same bytes on the wire, and much faster."""

from __future__ import annotations

import asyncio
import time

import pytest

from mesh402.mesh import iroh_fastcopy
from iroh import iroh_ffi as ffi


def _lower_lift(data) -> bytes:
    """Lower bytes into a RustBuffer exactly as a call argument would, then read them back."""
    rbuf = ffi._UniffiFfiConverterBytes.lower(data)
    return ffi._UniffiFfiConverterBytes.lift(rbuf)


@pytest.mark.parametrize(
    "payload",
    [b"", b"x", bytes(range(256)), b"\x00" * 17, bytes(range(256)) * 4099, bytearray(b"abc" * 1000), memoryview(b"hello world")],
)
def test_patched_write_is_byte_exact(payload):
    assert iroh_fastcopy.is_applied()
    assert _lower_lift(payload) == bytes(payload)


def test_patched_and_stock_agree():
    data = bytes(range(256)) * 513 + b"tail"
    patched = _lower_lift(data)
    iroh_fastcopy.revert()
    try:
        stock = _lower_lift(data)
    finally:
        iroh_fastcopy.apply()
    assert patched == stock == data
    assert iroh_fastcopy.is_applied()


def test_pack_into_still_encodes_integers():
    # _pack_into is used for every length prefix and integer argument
    b = ffi._UniffiRustBufferBuilder()
    b.write_i32(-5)
    b.write_u64(2**63 + 7)
    b.write_double(1.5)
    rbuf = b.finalize()
    with rbuf.consume_with_stream() as s:
        assert s.read_i32() == -5
        assert s.read_u64() == 2**63 + 7
        assert s.read_double() == 1.5


def _time_lower(data: bytes) -> float:
    t0 = time.perf_counter()
    rbuf = ffi._UniffiFfiConverterBytes.lower(data)
    dt = time.perf_counter() - t0
    rbuf.free()
    return dt


def test_throughput_check_lowering():
    """Lowering 2 MiB: stock loops per byte in Python, patched is one memmove."""
    data = b"\xab" * (2 << 20)
    patched = min(_time_lower(data) for _ in range(3))
    iroh_fastcopy.revert()
    try:
        stock = _time_lower(data)
    finally:
        iroh_fastcopy.apply()
    mbps_stock = len(data) / stock / 1e6
    mbps_patched = len(data) / patched / 1e6
    print(f"lowering 2 MiB: stock {mbps_stock:.1f} MB/s, patched {mbps_patched:.0f} MB/s ({stock / patched:.0f}x)")
    assert stock / patched > 10


def test_throughput_check_over_quic():
    """4 MiB over a real loopback QUIC stream, stock vs patched."""
    from iroh import Endpoint, EndpointOptions, RelayMode, SecretKey, preset_minimal

    async def run() -> tuple[float, float]:
        def opts():
            return EndpointOptions(preset=preset_minimal(), relay_mode=RelayMode.disabled(), bind_addr="127.0.0.1:0",
                                   secret_key=SecretKey.generate().to_bytes(), alpns=[b"fastcopy-test"])

        a, b = await Endpoint.bind(opts()), await Endpoint.bind(opts())
        total = 4 << 20
        chunk = b"\x5a" * (1 << 20)

        done = asyncio.Event()

        async def server():
            conn = await (await (await a.accept_next()).accept()).connect()
            for _ in range(2):
                bi = await conn.accept_bi()
                got = len(await bi.recv().read_to_end(total + 1))
                await bi.send().write_all(got.to_bytes(8, "little"))
                await bi.send().finish()
            await done.wait()  # keep the connection referenced until the client has read

        srv = asyncio.ensure_future(server())
        conn = await b.connect(a.addr(), b"fastcopy-test")

        async def upload() -> float:
            bi = await conn.open_bi()
            t0 = time.perf_counter()
            for _ in range(total // len(chunk)):
                await bi.send().write_all(chunk)
            await bi.send().finish()
            n = int.from_bytes(await bi.recv().read_to_end(8), "little")
            assert n == total
            return time.perf_counter() - t0

        t_patched = await upload()
        iroh_fastcopy.revert()
        try:
            t_stock = await upload()
        finally:
            iroh_fastcopy.apply()
        done.set()
        await srv
        await a.close()
        await b.close()
        return t_stock, t_patched

    t_stock, t_patched = asyncio.run(run())
    print(f"4 MiB upload: stock {4.194304 / t_stock:.1f} MB/s, patched {4.194304 / t_patched:.1f} MB/s")
    assert t_stock / t_patched > 3
