"""Record (de)serialization and ArrayRecord file helpers.

This project's records are flat dicts (str keys; bytes, str, int, float, bool, None or lists of those)
serialized with msgpack. Generic ArrayRecord files written by other tools are also readable:
msgpack maps, and ``tf.train.Example`` protos (the format TFDS and most Beam pipelines write), which
are parsed here with a small protobuf wire-format decoder so TensorFlow is never needed.

Files are written with ``group_size:1`` so that every record can be read by random access without
decoding a whole chunk, which is what a globally shuffled grain pipeline does.
"""
from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack

from clus_jax.common.files import atomic_path

WRITER_OPTIONS = "group_size:1"


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Serializes a flat dict to bytes (msgpack, bytes kept as bin, str as UTF-8)."""
    return msgpack.packb(dict(record), use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses a msgpack map or a ``tf.train.Example`` into a dict.

    ``tf.train.Example`` features come back as lists (bytes, float or int values). Raises ValueError on
    data that is neither format.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"record must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        return {}
    first = data[0]
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _decode_msgpack(data)
    if first == 0x0A:
        return parse_tf_example(data)
    raise ValueError(f"unrecognized record format (first byte 0x{first:02x})")


def _decode_msgpack(data: bytes) -> dict[str, Any]:
    try:
        out = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except UnicodeDecodeError:
        # Keep undecodable strings as bytes; caption validation rejects them later.
        raw = msgpack.unpackb(data, raw=True, strict_map_key=False)
        out = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in raw.items()}
    except Exception as e:  # msgpack raises several unrelated exception types on corrupt input.
        raise ValueError(f"corrupt msgpack record: {e}") from e
    if not isinstance(out, dict):
        raise ValueError("msgpack record is not a map")
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """Yields (field_number, wire_type, value) of one protobuf message; LEN values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _parse_feature(buf: bytes) -> list:
    values: list = []
    for kind, _, payload in _fields(buf):
        for field, wire, v in _fields(payload):
            if field != 1:
                continue
            if kind == 1:  # BytesList
                values.append(bytes(v))
            elif kind == 2:  # FloatList, packed or not
                values.extend(struct.unpack(f"<{len(v) // 4}f", v))
            elif kind == 3:  # Int64List, packed or not
                if wire == 2:
                    p = 0
                    while p < len(v):
                        x, p = _read_varint(v, p)
                        values.append(x - (1 << 64) if x >= 1 << 63 else x)
                else:
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values


def parse_tf_example(data: bytes) -> dict[str, list]:
    """Parses a serialized ``tf.train.Example`` into {feature name: list of values}."""
    out: dict[str, list] = {}
    for field, wire, features in _fields(data):
        if field != 1 or wire != 2:
            continue
        for f2, w2, entry in _fields(features):
            if f2 != 1 or w2 != 2:
                continue
            key, value = None, b""
            for f3, _, v in _fields(entry):
                if f3 == 1:
                    key = bytes(v).decode("utf-8")
                elif f3 == 2:
                    value = v
            if key is not None:
                out[key] = _parse_feature(value)
    return out


def expand_paths(pattern: str | Sequence[str], *, what: str = "data") -> list[str]:
    """Expands a glob, a comma-separated list of globs, or a list of paths into sorted existing files.

    Raises FileNotFoundError naming the pattern when nothing matches.
    """
    patterns = [p.strip() for p in pattern.split(",")] if isinstance(pattern, str) else list(pattern)
    files: list[str] = []
    for p in patterns:
        if not p:
            continue
        p = os.path.expanduser(str(p))
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
        if not matches:
            raise FileNotFoundError(f"no {what} files found at {p!r}")
        for m in matches:
            if os.path.isdir(m):
                raise FileNotFoundError(f"{what} path {m!r} is a directory; give a file or a glob of files")
        files.extend(matches)
    if not files:
        raise FileNotFoundError(f"no {what} files found at {pattern!r}")
    return files


def write_array_record(path: str, records: Iterable[Mapping[str, Any] | bytes]) -> int:
    """Writes records (dicts are serialized with ``encode_record``; bytes are written as is).

    Writes to a temporary name beside ``path`` then renames, so a reader never sees a half-written file.
    Returns the number of records written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    n = 0
    with atomic_path(path) as tmp:
        writer = ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
        try:
            for rec in records:
                writer.write(rec if isinstance(rec, (bytes, bytearray)) else encode_record(rec))
                n += 1
        finally:
            writer.close()
    return n


def read_array_record(path: str) -> list[dict[str, Any]]:
    """Reads every record of one ArrayRecord file, in order (for small files such as eval splits)."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.path.exists(path):
        raise FileNotFoundError(f"ArrayRecord file not found: {path!r}")
    reader = ArrayRecordReader(path)
    try:
        return [decode_record(r) for r in reader.read_all()]
    finally:
        reader.close()
