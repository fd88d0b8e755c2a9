"""Frame encoding/decoding: round trips, and hostile bytes only ever raise FrameError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from mesh402.mesh import framing
from mesh402.mesh.framing import (
    BadGeneration,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
    StreamType,
    TruncatedFrame,
    UnexpectedFrame,
    UnknownStreamType,
    decode_body,
    decode_frame,
    encode_frame,
    make_frame,
    split_frames,
)
from mesh402.mesh.proto import mesh_pb2 as pb

FAST = settings(max_examples=300, deadline=None)


def sample_frames():
    return [
        make_frame(ping=pb.Ping(nonce=7, sent_at_us=123, sender_id=b"\x01" * 32)),
        make_frame(gossip=pb.Gossip(sender_id=b"\x02" * 32, announcements=[pb.SignedAnnouncement(announcement=b"a", signature=b"s" * 64)])),
        make_frame(stage=pb.StageFrame(request_id="r1", plan_epoch=3, activations=b"\x00" * 1000, activation_hashes=[b"h" * 32])),
        make_frame(echo=pb.Echo(payload=b"")),
    ]


def test_round_trip():
    frames = sample_frames()
    buf = b"".join(encode_frame(f) for f in frames)
    out = split_frames(buf)
    assert [f.SerializeToString() for f in out] == [f.SerializeToString() for f in frames]


def test_stream_types_are_distinct_bytes():
    values = [int(t) for t in StreamType]
    assert len(values) == len(set(values))
    assert StreamType.GOSSIP == 0x01
    with pytest.raises(UnknownStreamType):
        framing.parse_stream_type(0xEE)


def test_wrong_generation():
    f = pb.Frame(gen=2, ping=pb.Ping(nonce=1))
    data = f.SerializeToString()
    with pytest.raises(BadGeneration):
        decode_frame(struct.pack("<I", len(data)) + data)
    f0 = pb.Frame(ping=pb.Ping(nonce=1))  # gen missing = 0
    with pytest.raises(BadGeneration):
        decode_body(f0.SerializeToString())


def test_oversized_rejected_before_reading():
    with pytest.raises(FrameTooLarge):
        decode_frame(struct.pack("<I", framing.MAX_FRAME_SIZE + 1))
    big = make_frame(echo=pb.Echo(payload=b"x" * 2000))
    with pytest.raises(FrameTooLarge):
        encode_frame(big, max_size=1000)
    with pytest.raises(FrameTooLarge):
        decode_frame(encode_frame(big), max_size=1000)


def test_truncated():
    enc = encode_frame(sample_frames()[1])
    for cut in (1, 3, 4, len(enc) - 1):
        with pytest.raises(TruncatedFrame):
            decode_frame(enc[:cut])


def test_empty_body_and_unexpected():
    with pytest.raises(MalformedFrame):
        decode_body(pb.Frame(gen=1).SerializeToString())
    with pytest.raises(UnexpectedFrame):
        decode_body(make_frame(ping=pb.Ping()).SerializeToString(), expect=("hello",))


def test_error_codes_are_counter_names():
    codes = {c.code for c in (UnknownStreamType, FrameTooLarge, TruncatedFrame, MalformedFrame, BadGeneration, UnexpectedFrame)}
    assert len(codes) == 6


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_frame_errors(buf):
    try:
        split_frames(buf, max_size=1 << 16)
    except FrameError:
        pass


@FAST
@given(st.binary(max_size=512))
def test_random_body_only_raises_frame_errors(body):
    try:
        f = decode_body(body)
    except FrameError:
        return
    assert f.gen == framing.PROTOCOL_GENERATION and f.WhichOneof("body")


@FAST
@given(st.integers(0, 3), st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_mutated_valid_frames(which, pos, junk):
    enc = bytearray(encode_frame(sample_frames()[which]))
    pos %= len(enc)
    enc[pos : pos + len(junk)] = junk
    try:
        split_frames(bytes(enc))
    except FrameError:
        pass


@FAST
@given(st.lists(st.binary(max_size=300), max_size=5), st.integers(1, 2**32 - 1))
def test_echo_frames_round_trip(payloads, nonce):
    frames = [make_frame(echo=pb.Echo(payload=p, sent_at_us=nonce)) for p in payloads]
    out = split_frames(b"".join(encode_frame(f) for f in frames))
    assert [f.echo.payload for f in out] == payloads
