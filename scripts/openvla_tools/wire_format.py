"""Numpy arrays on the wire between `scripts/serve.py` and its clients, never pickled.

Two encodings, each the one its protocol's existing clients already speak:

- msgpack (the openpi websocket protocol): an array is a map `{"__ndarray__": True, "data": <raw bytes>, "dtype":
  <numpy dtype string, e.g. "<f4">, "shape": [...]}` and a numpy scalar `{"__npgeneric__": True, "data": <value>,
  "dtype": ...}`. openpi's packer writes these keys as msgpack binary strings; both binary and text keys are read.
- JSON (the official OpenVLA `/act` REST protocol): `json_numpy`'s map `{"__numpy__": <base64 of the raw bytes>,
  "dtype": <dtype descr>, "shape": [...]}`.

Only numeric and boolean dtypes cross the wire: an object, void or other dtype is refused with a `WireFormatError`,
as is anything that does not decode.
"""

import json
from typing import Any

import json_numpy
import msgpack
import numpy as np
from numpy.lib.format import descr_to_dtype

# bool, signed and unsigned integers, floats
ARRAY_KINDS = "biuf"


class WireFormatError(ValueError):
    """A message that does not decode: not msgpack / JSON, or an array that is malformed or of a refused dtype."""


def _checked_dtype(dtype: Any) -> np.dtype:
    try:
        dtype = descr_to_dtype(dtype) if isinstance(dtype, list) else np.dtype(dtype)
    except (TypeError, ValueError) as error:
        raise WireFormatError(f"Array dtype {dtype!r} is not a numpy dtype ({error}).") from None
    if dtype.kind not in ARRAY_KINDS:
        raise WireFormatError(f"Array dtype {dtype.str!r} is refused: send a numeric array (bool, int, uint or float).")
    return dtype


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireFormatError(f"Array shape {shape!r} is not a list of non-negative integers.")
    return tuple(shape)


def _array_from_bytes(data: Any, dtype: Any, shape: Any) -> np.ndarray:
    if not isinstance(data, bytes):
        raise WireFormatError(f"Array data must be bytes, got {type(data).__name__}.")
    dtype, shape = _checked_dtype(dtype), _shape(shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise WireFormatError(
            f"Array of shape {list(shape)} and dtype {dtype.str} needs {expected} bytes, got {len(data)}."
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _encode_msgpack(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        _checked_dtype(value.dtype)
        return {b"__ndarray__": True, b"data": value.tobytes(), b"dtype": value.dtype.str, b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        _checked_dtype(value.dtype)
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"Cannot send a {type(value).__name__} in msgpack.")


def _field(obj: dict, name: str) -> Any:
    return obj[name.encode()] if name.encode() in obj else obj.get(name)


def _decode_msgpack(obj: dict) -> Any:
    if _field(obj, "__ndarray__"):
        return _array_from_bytes(_field(obj, "data"), _field(obj, "dtype"), _field(obj, "shape"))
    if _field(obj, "__npgeneric__"):
        return _checked_dtype(_field(obj, "dtype")).type(_field(obj, "data"))
    return obj


def pack_msgpack(obj: Any) -> bytes:
    """A structure of dicts, lists, strings, numbers and numpy arrays -> msgpack bytes in openpi's encoding."""
    return msgpack.packb(obj, default=_encode_msgpack)


def unpack_msgpack(data: bytes) -> Any:
    """msgpack bytes -> the structure, with arrays decoded (read-only views of `data`)."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_msgpack)
    except WireFormatError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise WireFormatError(f"The message is not valid msgpack ({type(error).__name__}: {error}).") from None


def dumps_json(obj: Any) -> str:
    """A structure with numpy arrays -> JSON text in `json_numpy`'s encoding."""
    return json_numpy.dumps(obj)


def _decode_json(obj: dict) -> Any:
    if "__numpy__" not in obj:
        return obj
    _checked_dtype(obj.get("dtype"))
    try:
        return json_numpy.object_hook(obj)
    except (KeyError, TypeError, ValueError) as error:
        raise WireFormatError(f"A json_numpy array does not decode ({type(error).__name__}: {error}).") from None


def loads_json(text: str | bytes | bytearray) -> Any:
    """JSON text (UTF-8 when bytes) -> the structure, with `json_numpy` arrays decoded (whether or not
    `json_numpy.patch()` was called in this process)."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return json.JSONDecoder(object_hook=_decode_json).decode(text)
    except WireFormatError:
        raise
    except (ValueError, TypeError, RecursionError) as error:
        raise WireFormatError(f"The body is not valid JSON ({type(error).__name__}: {error}).") from None
