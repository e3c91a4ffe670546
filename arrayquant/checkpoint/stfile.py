"""The safetensors container: a strict header reader, a streaming writer, tensor digests.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON (``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``,
padded with spaces), then the tensors' bytes. Reading the tensors is left to the
``safetensors`` package; this module bounds and checks what comes before it
(header size, JSON nesting, duplicate keys, NaN literals), so that a hostile
header raises :class:`CheckpointError` instead of a crash or a silently merged key,
and writes files one tensor at a time with a SHA-256 digest of each.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "DIGEST_PREFIX",
    "MAX_HEADER_BYTES",
    "NAME_TO_ST",
    "ST_TO_NAME",
    "StreamWriter",
    "canonical_json",
    "digest",
    "np_dtype",
    "read_raw_header",
    "strict_json",
]

# safetensors dtype codes <-> NumPy dtype names (the ones NumPy can hold).
ST_TO_NAME = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}
NAME_TO_ST = {v: k for k, v in ST_TO_NAME.items()}

#: The largest header arrayquant reads (the safetensors package's own limit).
MAX_HEADER_BYTES = 100_000_000
DIGEST_PREFIX = "sha256:"


class CheckpointError(ValueError):
    """A checkpoint file is malformed, inconsistent or unsupported (the message says where)."""


def np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` C-contiguous with little-endian items (safetensors' byte order), same values."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.itemsize > 1 else a


def _raw_bytes(a: np.ndarray) -> memoryview:
    """The bytes safetensors stores for ``a``: little-endian items in C order."""
    return memoryview(little_endian(a).reshape(-1).view(np.uint8))


def digest(a) -> str:
    """``"sha256:<hex>"`` of an array's bytes in the file, or of a bytes-like object."""
    return _named(hashlib.sha256(_raw_bytes(a) if isinstance(a, np.ndarray) else a))


def _named(h) -> str:
    return DIGEST_PREFIX + h.hexdigest()


def canonical_json(obj) -> str:
    """The one serialization arrayquant writes (and re-derives to check a digest)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# --------------------------------------------------------------------------- strict JSON

def _depth(doc) -> int:
    """Deepest nesting of lists and objects in a parsed document (0 for a scalar), iteratively."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict)
                                                  else node))
    return deepest


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one JSON object")
        out[k] = v
    return out


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not accepted)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} overflows to {v}")
    return v


def strict_json(text: str | bytes, what: str, file, max_depth: int):
    """Parse JSON refusing duplicate keys, NaN/Infinity, numbers that overflow and nesting
    deeper than ``max_depth``. Parsing and the depth count both take time linear in the
    text; nesting beyond Python's recursion limit stops the parser with RecursionError."""
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                         parse_float=_finite_float)
    except RecursionError:
        raise CheckpointError(f"{file}: the {what} is nested too deeply; arrayquant reads at "
                              f"most {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
        raise CheckpointError(f"{file}: the {what} is not valid JSON ({e})") from None
    depth = _depth(doc)
    if depth > max_depth:
        raise CheckpointError(f"{file}: the {what} is nested {depth} levels deep; arrayquant "
                              f"reads at most {max_depth}")
    return doc


def read_raw_header(file) -> dict[str, Any]:
    """The safetensors header of ``file`` as a dict, checked for size, nesting and duplicates.

    Checks only the JSON layer; tensor entries are checked by ``safetensors`` itself.
    """
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {len(head)} bytes is too short for a safetensors "
                                  "file (it starts with an 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        size = fh.seek(0, 2)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{file}: the header length field says {n} bytes, but "
                + (f"the file holds only {size - 8} after it" if n > size - 8
                   else f"arrayquant reads headers of at most {MAX_HEADER_BYTES} bytes")
            )
        fh.seek(8)
        raw = fh.read(n)
    header = strict_json(raw, "safetensors header", file, max_depth=3)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header must be a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{file}: the safetensors '__metadata__' must map strings to "
                              "strings")
    for name, entry in header.items():
        if name != "__metadata__" and not (
                isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise CheckpointError(f"{file}: the safetensors entry of tensor {name!r} must hold "
                                  f"exactly 'dtype', 'shape' and 'data_offsets'; got "
                                  f"{canonical_json(entry)[:120]}")
    return header


# --------------------------------------------------------------------------- writing


class StreamWriter:
    """Writes a safetensors file whose tensors are known up front, one tensor at a time.

    The header (8-byte little-endian length, then JSON padded with spaces to a
    multiple of 8) lists every tensor's dtype, shape and byte range; the data
    follows in the same order, so each tensor can be written and dropped. The
    digest of each tensor is taken as it is written; ``metadata(digests)`` builds
    the ``__metadata__`` dict, and :meth:`close` rewrites the header in place with
    the real digests (placeholders of the same length hold their place, so the
    header's length never changes).
    """

    def __init__(self, fh, specs: list[tuple[str, str, tuple[int, ...]]], metadata):
        self._fh = fh
        self._metadata = metadata
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self._digests = {name: DIGEST_PREFIX + "0" * 64 for name, _, _ in self._order}
        self._next = 0
        self._threads = None
        self._header_len = None
        self._write_header()

    def _header(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": self._metadata(self._digests)}
        offset = 0
        for name, dtype, shape in self._order:
            nbytes = math.prod(shape) * np_dtype(dtype).itemsize
            header[name] = {"dtype": NAME_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = canonical_json(header).encode()
        return text + b" " * (-len(text) % 8)

    def _write_header(self) -> None:
        text = self._header()
        if self._header_len is not None and len(text) != self._header_len:
            raise RuntimeError("internal error: the header changed length when its digests "
                               "were filled in")
        self._header_len = len(text)
        self._fh.write(struct.pack("<Q", len(text)))
        self._fh.write(text)

    def write(self, name: str, a) -> None:
        exp_name, exp_dtype, exp_shape = self._order[self._next]
        a = np.asarray(a)
        if (name, a.dtype.name, a.shape) != (exp_name, exp_dtype, exp_shape):
            raise RuntimeError(
                f"internal error: tensor {name!r} {a.dtype.name}{list(a.shape)} does not match "
                f"the header's {exp_name!r} {exp_dtype}{list(exp_shape)}"
            )
        raw = _raw_bytes(a)
        if len(raw) < 1 << 20:
            self._digests[name] = digest(raw)
            self._fh.write(raw)
        else:  # hashlib and the write both release the GIL: take the digest meanwhile
            hashed = self._pool().submit(hashlib.sha256, raw)
            self._fh.write(raw)
            self._digests[name] = _named(hashed.result())
        self._next += 1

    @property
    def digests(self) -> dict[str, str]:
        """``{name: "sha256:..."}`` of the tensors written so far."""
        return {name: self._digests[name] for name, _, _ in self._order[: self._next]}

    def _pool(self):
        if self._threads is None:
            from concurrent.futures import ThreadPoolExecutor

            self._threads = ThreadPoolExecutor(1)
        return self._threads

    def close(self) -> None:
        """Fill in the digests and flush; the caller's atomic rename makes the file visible."""
        if self._threads is not None:
            self._threads.shutdown()
        if self._next != len(self._order):
            raise RuntimeError("internal error: not every tensor was written")
        self._fh.seek(0)
        self._write_header()
        self._fh.flush()
