"""Wire format: bit-exact round trips, bounded int8 error, and every kind of damage named."""
from __future__ import annotations

import zlib

import msgpack
import numpy as np
import pytest

from buffer.codec import SCHEMA, CodecError, decode_transition, decode_weights, encode_transition, encode_weights
from buffer.synthetic import random_transition
from selfspec.transitions import ARRAY_FIELDS


def _transition(**kw):
    t = random_transition(np.random.default_rng(7), n=5, d=64, k=8, window=3, **kw)
    t.t_start, t.t_end, t.temperature = 1_763_900_000.123456, 1_763_900_000.25, 0.7
    return t


def _reseal(body: dict, kind: str = "transition", schema: int = SCHEMA) -> bytes:
    """A blob with a valid header and checksum around a body the test chose."""
    packed = msgpack.packb(body)
    return msgpack.packb({"schema": schema, "kind": kind, "crc": zlib.crc32(packed), "size": len(packed)}) + packed


def _body(blob: bytes) -> dict:
    unpacker = msgpack.Unpacker()
    unpacker.feed(blob)
    unpacker.unpack()
    return unpacker.unpack()


def test_every_field_round_trips_bit_exact():
    t = _transition(actor_id=np.int64(3), head_version=np.int32(12))  # numpy scalars, as an engine may hand over
    back = decode_transition(encode_transition(t))
    for name in ARRAY_FIELDS:
        sent, got = getattr(t, name), getattr(back, name)
        assert got.dtype == sent.dtype and got.shape == sent.shape, name
        assert got.tobytes() == sent.tobytes(), name
    assert back.scalars() == t.scalars()
    assert type(back.actor_id) is int and type(back.head_version) is int and type(back.t_start) is float
    assert back.transition_id == t.transition_id


def test_empty_context_window_round_trips():
    t = random_transition(np.random.default_rng(0), n=4, d=576, k=16)
    assert decode_transition(encode_transition(t)).context_hidden.shape == (0, 0)


def test_int8_hidden_error_is_bounded_per_row():
    t = _transition()
    rng = np.random.default_rng(1)
    # rows of very different magnitude, one all-zero: a single global scale would fail these
    t.hidden = (rng.standard_normal((5, 64)) * np.array([[1e-3], [0.1], [1], [30], [0]])).astype(np.float16)
    plain, quantized = encode_transition(t), encode_transition(t, quantize_hidden=True)
    back = decode_transition(quantized)
    assert back.hidden.dtype == np.float16 and len(quantized) < len(plain)
    sent, got = t.hidden.astype(np.float64), back.hidden.astype(np.float64)
    peak = np.abs(sent).max(axis=1, keepdims=True)
    # int8 rounding (peak/254) plus float16 rounding of the result (2^-11 relative)
    assert np.all(np.abs(got - sent) <= peak / 254 + np.abs(sent) * 2.0 ** -10 + 1e-7)
    assert np.all(got[4] == 0)
    relative_rms = np.sqrt(((got - sent) ** 2).sum() / (sent ** 2).sum())
    assert relative_rms < 0.01
    assert back.context_hidden.shape == (3, 64)  # quantised too, same bound
    assert np.abs(back.context_hidden.astype(np.float64) - t.context_hidden).max() <= np.abs(t.context_hidden).max() / 100


def test_int8_refuses_non_finite_hidden():
    t = _transition()
    t.hidden[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        encode_transition(t, quantize_hidden=True)


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


def _wrong_dtype(blob: bytes) -> bytes:
    body = _body(blob)
    body["arrays"]["draft_logprobs"]["dtype"] = "<f8"
    body["arrays"]["draft_logprobs"]["bytes"] *= 2
    return _reseal(body)


def _wrong_shape(blob: bytes) -> bytes:
    body = _body(blob)
    body["arrays"]["hidden"]["shape"] = [5, 65]
    return _reseal(body)


def _inconsistent(blob: bytes) -> bytes:  # each array fine alone, but n disagrees between fields
    body = _body(blob)
    body["arrays"]["target_tokens"] = {"dtype": "<i4", "shape": [4], "bytes": bytes(16)}
    return _reseal(body)


def _object_dtype(blob: bytes) -> bytes:
    body = _body(blob)
    body["arrays"]["hidden"]["dtype"] = "|O"
    return _reseal(body)


def _missing_field(blob: bytes) -> bytes:
    body = _body(blob)
    del body["scalars"]["round"]
    return _reseal(body)


def _schema_2_frame(blob: bytes) -> bytes:
    body = _body(blob)
    body["scalars"]["policy_version"] = body["scalars"].pop("head_version")
    return _reseal(body, schema=2)


@pytest.mark.parametrize("damage, reason", [
    (_flip_last_byte, "checksum"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:3], "header"),
    (lambda b: b"\x00" * 40, "schema"),
    (lambda b: _reseal({"x": 1}, kind="weights"), "expected 'transition'"),
    (lambda b: msgpack.packb({"schema": SCHEMA + 1, "kind": "transition"}) + b, f"schema {SCHEMA + 1}"),
    (_schema_2_frame, "schema 2, this build reads schema 3"),  # before policy_version became head_version
    (_wrong_dtype, "dtype float64, expected float32"),
    (_wrong_shape, "do not fill shape"),
    (_inconsistent, "inconsistent transition"),
    (_object_dtype, "not an allowed numeric dtype"),
    (_missing_field, "missing \\['round'\\]"),
])
def test_damaged_blobs_raise_codec_error_naming_the_problem(damage, reason):
    blob = encode_transition(_transition())
    with pytest.raises(CodecError, match=reason):
        decode_transition(damage(blob))


def test_weights_round_trip_and_refuse_unsendable_dtypes():
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], np.int8),
              "empty": np.zeros((0, 5), np.float16), "big_endian": np.arange(3, dtype=">f4")}
    version, back, meta = decode_weights(encode_weights(4, arrays, {"base_model": "m", "step": 10}))
    assert version == 4 and meta == {"base_model": "m", "step": 10}
    for name, a in arrays.items():
        assert np.array_equal(back[name], a) and back[name].shape == a.shape, name
    assert back["big_endian"].dtype == np.dtype("<f4")
    with pytest.raises(ValueError, match="cannot travel"):
        encode_weights(1, {"o": np.array([object()])}, {})
    with pytest.raises(ValueError, match="meta"):
        encode_weights(1, {}, {"when": object()})
    with pytest.raises(CodecError, match="expected 'weights'"):
        decode_weights(encode_transition(_transition()))

