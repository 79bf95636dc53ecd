"""Wire format for transitions and head weights: msgpack only, never pickle.

A blob is two msgpack maps back to back: a small header {schema, kind, crc, size} and the body,
where `crc` is zlib.crc32 of the body's bytes and `size` their number. So every byte of content
(scalars, dtypes, shapes, array bytes) is covered by the checksum, a truncated blob is named as
such, and decoding never copies the body just to check it. Arrays travel as {dtype, shape, bytes}
in little-endian order. Decoding checks the schema, kind, size, checksum, every dtype against an
allow-list and the contract, and every byte count against its shape, and raises CodecError (a
ValueError) naming what is wrong.
"""
from __future__ import annotations

import sys
import typing
import zlib

import msgpack
import numpy as np

from selfspec.transitions import ARRAY_FIELDS, SCALAR_FIELDS, Transition, TransitionError

SCHEMA = 3  # 2: every verified position is a row, with its kind; 3: `policy_version` renamed `head_version`
QUANTIZABLE = ("hidden", "context_hidden")  # the big float16 fields; everything else is tiny
_HEADER_MAX = 128  # a header is ~40 bytes; reading only this much keeps the body uncopied
_DTYPES = {np.dtype(t).newbyteorder("<").str: np.dtype(t).newbyteorder("<") for t in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64)}
# Computed once: dtype.str costs as much as packing a small array.
_WIRE_STR = {name: dtype.newbyteorder("<").str for name, (dtype, _) in ARRAY_FIELDS.items()}
if sys.byteorder != "little":  # transitions are sent as native bytes, which must be the wire's little-endian
    raise ImportError("buffer.codec needs a little-endian host")
# Scalars are cast on the way out (numpy ints are not msgpack types) and type-checked on the way in.
_SCALAR_TYPES = {name: typing.get_type_hints(Transition)[name] for name in SCALAR_FIELDS}
if not all(hint in (str, int, float) for hint in _SCALAR_TYPES.values()):
    raise ImportError(f"buffer.codec carries only str/int/float scalars, Transition has {_SCALAR_TYPES}")


class CodecError(ValueError):
    """A blob that cannot be decoded into what it claims to be."""


def encode_transition(t: Transition, *, quantize_hidden: bool = False) -> bytes:
    arrays = {}
    for name, (dtype, _) in ARRAY_FIELDS.items():
        a = getattr(t, name)
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TransitionError(f"{name}: {got}, expected a numpy array of {dtype}")
        arrays[name] = (_pack_quantized(a) if quantize_hidden and name in QUANTIZABLE and a.size
                        else {"dtype": _WIRE_STR[name], "shape": a.shape, "bytes": a.tobytes()})
    try:
        scalars = {name: cast(getattr(t, name)) for name, cast in _SCALAR_TYPES.items()}
    except (TypeError, ValueError) as err:
        raise TransitionError(f"scalar field does not convert: {err}") from None
    return _seal("transition", {"scalars": scalars, "arrays": arrays})


def decode_transition(blob: bytes) -> Transition:
    body = _open(blob, "transition")
    scalars, arrays = body.get("scalars"), body.get("arrays")
    if not isinstance(scalars, dict) or not isinstance(arrays, dict):
        raise CodecError("transition body needs `scalars` and `arrays` maps")
    if set(scalars) != set(_SCALAR_TYPES) or set(arrays) != set(ARRAY_FIELDS):
        missing = (set(_SCALAR_TYPES) | set(ARRAY_FIELDS)) - set(scalars) - set(arrays)
        extra = (set(scalars) | set(arrays)) - set(_SCALAR_TYPES) - set(ARRAY_FIELDS)
        raise CodecError(f"transition fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, hint in _SCALAR_TYPES.items():
        if not isinstance(scalars[name], hint):
            raise CodecError(f"{name}: {type(scalars[name]).__name__}, expected {hint.__name__}")
    decoded = {name: _unpack_field(name, arrays[name], ARRAY_FIELDS[name][0]) for name in ARRAY_FIELDS}
    try:
        return Transition.from_parts(scalars, decoded)
    except TransitionError as err:
        raise CodecError(f"inconsistent transition: {err}") from None


def encode_weights(version: int, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    if not isinstance(version, int) or version < 0:
        raise ValueError(f"weights version must be a non-negative int, got {version!r}")
    packed = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise ValueError(f"weights: {name!r} must map a str to a numpy array")
        if a.dtype.newbyteorder("<").str not in _DTYPES:
            raise ValueError(f"weights {name}: dtype {a.dtype} cannot travel; use a plain numeric dtype")
        packed[name] = _pack_array(a)
    try:
        return _seal("weights", {"version": version, "meta": meta, "arrays": packed})
    except TypeError as err:
        raise ValueError(f"weights meta must hold only str/int/float/bool/list/dict values: {err}") from None


def decode_weights(blob: bytes) -> tuple[int, dict[str, np.ndarray], dict]:
    """(version, arrays, meta). The arrays are read-only views: copy them into the model's parameters."""
    body = _open(blob, "weights")
    version, meta, arrays = body.get("version"), body.get("meta"), body.get("arrays")
    if not isinstance(version, int) or not isinstance(meta, dict) or not isinstance(arrays, dict):
        raise CodecError("weights body needs an int `version`, a `meta` map and an `arrays` map")
    return version, {str(name): _unpack_field(name, rec, None) for name, rec in arrays.items()}, meta


def encode_frame(blobs: list[bytes]) -> bytes:
    """Several encoded transitions in one stream entry; each keeps its own checksum."""
    return msgpack.packb(blobs)


def decode_frame(data: bytes) -> list[bytes]:
    blobs = _unpack(data, "frame")
    if not isinstance(blobs, list) or not all(isinstance(b, bytes) for b in blobs):
        raise CodecError("frame is not a list of blobs")
    return blobs


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per row: |error| <= scale / 2 = max|row| / 254."""
    x32 = x.astype(np.float32)
    peak = np.abs(x32).max(axis=1)
    if not np.isfinite(peak).all():
        raise TransitionError("cannot quantise non-finite hidden states to int8")
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    return np.rint(x32 / scale[:, None]).astype(np.int8), scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scale[:, None]).astype(np.float16)


def _pack_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    # A memoryview avoids copying big weight arrays; msgpack refuses views of empty arrays.
    return {"dtype": a.dtype.str, "shape": a.shape, "bytes": memoryview(a) if a.size else b""}


def _pack_quantized(a: np.ndarray) -> dict:
    q, scale = quantize_rows(a)
    return {"dtype": a.dtype.str, "shape": a.shape, "quant": "int8",
            "bytes": q.tobytes(), "scale": scale.astype("<f4").tobytes()}


def _unpack_field(name: str, rec, expected: np.dtype | None) -> np.ndarray:
    if not isinstance(rec, dict):
        raise CodecError(f"{name}: expected a {{dtype, shape, bytes}} map")
    dtype_str, shape, data = rec.get("dtype"), rec.get("shape"), rec.get("bytes")
    dtype = _DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        raise CodecError(f"{name}: dtype {dtype_str!r} is not an allowed numeric dtype")
    if expected is not None and dtype != expected:
        raise CodecError(f"{name}: dtype {dtype}, expected {expected}")
    if not isinstance(shape, list) or not isinstance(data, bytes):
        raise CodecError(f"{name}: malformed shape {shape!r} or bytes")
    quant = rec.get("quant")
    if quant is None:
        return _view(name, data, dtype, shape)
    if quant != "int8" or name not in QUANTIZABLE or len(shape) != 2 or not isinstance(rec.get("scale"), bytes):
        raise CodecError(f"{name}: malformed int8 quantisation")
    return dequantize_rows(_view(name, data, np.dtype(np.int8), shape),
                           _view(name + ".scale", rec["scale"], np.dtype("<f4"), shape[:1]))


def _view(name: str, data: bytes, dtype: np.dtype, shape: list) -> np.ndarray:
    # reshape checks the byte count; comparing shapes afterwards rejects the -1 wildcard
    try:
        arr = np.frombuffer(data, dtype).reshape(shape)
    except (ValueError, TypeError):
        arr = None
    if arr is None or list(arr.shape) != shape:
        raise CodecError(f"{name}: {len(data)} bytes do not fill shape {shape} of {dtype}")
    return arr


def _seal(kind: str, body: dict) -> bytes:
    packed = msgpack.packb(body)
    return msgpack.packb({"schema": SCHEMA, "kind": kind, "crc": zlib.crc32(packed), "size": len(packed)}) + packed


def _open(blob: bytes, kind: str) -> dict:
    view = memoryview(blob)
    header_reader = msgpack.Unpacker()
    header_reader.feed(view[:_HEADER_MAX])
    try:
        header = header_reader.unpack()
    except (ValueError, TypeError, msgpack.OutOfData) as err:
        raise CodecError(f"no readable header ({type(err).__name__})") from None
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        schema = header.get("schema") if isinstance(header, dict) else None
        raise CodecError(f"schema {schema!r}, this build reads schema {SCHEMA}")
    if header.get("kind") != kind:
        raise CodecError(f"blob holds {header.get('kind')!r}, expected {kind!r}")
    body = view[header_reader.tell():]
    if len(body) != header.get("size"):
        raise CodecError(f"truncated or padded: body of {len(body)} bytes, header says {header.get('size')!r}")
    if zlib.crc32(body) != header.get("crc"):
        raise CodecError("checksum mismatch: the blob was corrupted")
    inner = _unpack(body, "body")
    if not isinstance(inner, dict):
        raise CodecError("body is not a map")
    return inner


def _unpack(data, what: str):
    try:
        return msgpack.unpackb(data)
    except (ValueError, TypeError) as err:  # msgpack's own errors are ValueErrors
        raise CodecError(f"{what} is not valid msgpack ({type(err).__name__}: {err})") from None
