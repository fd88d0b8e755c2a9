"""The iroh per-byte-copy fix: same bytes on the wire, copied in one step instead of one per byte (how much
faster that is: benchmarks/mesh.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
from collections.abc import Iterator

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


_COPIERS = {"write", "_pack_into", "_fast_write", "_fast_pack_into"}  # the builder's copy functions, stock and patched


@contextlib.contextmanager
def _copy_steps() -> Iterator[list[int]]:
    """Count, in [0], the Python lines this thread executes inside the binding's byte-copy functions while the
    block runs (stock: a few per byte; patched: a few per call, whatever the size). A count, not a time: the
    same on any machine."""
    steps = [0]

    def local(frame, event, arg):
        if event == "line":
            steps[0] += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_name in _COPIERS else None

    sys.settrace(tracer)
    try:
        yield steps
    finally:
        sys.settrace(None)


def test_lowering_copies_in_one_step_not_per_byte():
    """Lowering 64 KiB: stock loops per byte in Python, patched is one memmove (the speed: benchmarks/mesh.py)."""
    data = b"\xab" * (64 << 10)
    with _copy_steps() as patched:
        ffi._UniffiFfiConverterBytes.lower(data).free()
    iroh_fastcopy.revert()
    try:
        with _copy_steps() as stock:
            ffi._UniffiFfiConverterBytes.lower(data).free()
    finally:
        iroh_fastcopy.apply()
    print(f"lowering 64 KiB: {stock[0]} copy steps stock, {patched[0]} patched")
    assert stock[0] >= len(data) and 0 < patched[0] < 50


def test_an_upload_over_quic_arrives_exact_with_no_per_byte_copy():
    """4 MiB over a real loopback QUIC stream with the patch: every byte arrives, and the copy work does not
    grow with the size (stock: over 4 million steps, see the lowering test)."""
    from iroh import Endpoint, EndpointOptions, RelayMode, SecretKey, preset_minimal

    total = 4 << 20
    payload = hashlib.sha256(b"seed").digest() * (total // 32)

    async def run() -> tuple[int, bytes]:
        def opts():
            return EndpointOptions(preset=preset_minimal(), relay_mode=RelayMode.disabled(), bind_addr="127.0.0.1:0",
                                   secret_key=SecretKey.generate().to_bytes(), alpns=[b"fastcopy-test"])

        a, b = await Endpoint.bind(opts()), await Endpoint.bind(opts())
        done = asyncio.Event()

        async def server():
            conn = await (await (await a.accept_next()).accept()).connect()
            bi = await conn.accept_bi()
            got = bytes(await bi.recv().read_to_end(total + 1))
            await bi.send().write_all(hashlib.sha256(got).digest())
            await bi.send().finish()
            await done.wait()  # keep the connection referenced until the client has read

        srv = asyncio.ensure_future(server())
        conn = await b.connect(a.addr(), b"fastcopy-test")
        bi = await conn.open_bi()
        with _copy_steps() as steps:  # the server only reads meanwhile: the copies counted are the upload's
            for i in range(0, total, 1 << 20):
                await bi.send().write_all(payload[i:i + (1 << 20)])
        await bi.send().finish()
        digest = bytes(await bi.recv().read_to_end(64))
        done.set()
        await srv
        await a.close()
        await b.close()
        return steps[0], digest

    assert iroh_fastcopy.is_applied()
    steps, digest = asyncio.run(run())
    print(f"4 MiB upload: {steps} copy steps")
    assert digest == hashlib.sha256(payload).digest()
    assert 0 < steps < 200
