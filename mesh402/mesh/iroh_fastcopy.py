"""Fix for the per-byte copy in the iroh 1.2.0 Python binding.

uniffi's generated ``_UniffiRustBufferBuilder.write`` copies every ``bytes``
argument into the Rust buffer one byte at a time in a Python loop, so a
64 MiB ``SendStream.write_all`` burns ~7 s of CPU. (Upstream:
n0-computer/iroh-ffi#229, fixed in uniffi-rs PR #2824 / uniffi 0.32; the
iroh 1.2.0 wheel predates the fix.)

``apply()`` replaces ``write`` (and the small fixed-size ``_pack_into``) with a
single ``ctypes.memmove``. It is idempotent and is called on import of
``mesh402.mesh``; every module that touches iroh imports it first.
"""

from __future__ import annotations

import ctypes
import struct

from iroh import iroh_ffi as _ffi

_Builder = _ffi._UniffiRustBufferBuilder
_ORIGINAL_WRITE = _Builder.write
_ORIGINAL_PACK_INTO = _Builder._pack_into

_applied = False


def _fast_write(self, value) -> None:
    n = len(value)
    if n == 0:
        return
    if not isinstance(value, bytes):
        value = bytes(value)  # one C-level copy for bytearray/memoryview
    with self._reserve(n):
        dst = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value + self.rbuf.len
        ctypes.memmove(dst, value, n)


def _fast_pack_into(self, size, format, value) -> None:
    packed = struct.pack(format, value)
    with self._reserve(size):
        dst = ctypes.cast(self.rbuf.data, ctypes.c_void_p).value + self.rbuf.len
        ctypes.memmove(dst, packed, size)


def apply() -> bool:
    """Patch the binding in place. Returns True if this call applied it."""
    global _applied
    if _applied:
        return False
    _Builder.write = _fast_write
    _Builder._pack_into = _fast_pack_into
    _applied = True
    return True


def revert() -> None:
    """Restore the stock (slow) implementation; for benchmarks and tests."""
    global _applied
    _Builder.write = _ORIGINAL_WRITE
    _Builder._pack_into = _ORIGINAL_PACK_INTO
    _applied = False


def is_applied() -> bool:
    return _Builder.write is _fast_write


apply()
