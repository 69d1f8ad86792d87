"""Just enough of Kubernetes' protobuf encoding to accept what `kubectl create namespace|configmap|secret|
serviceaccount` sends (kubectl's typed clients write protobuf and do not fall back to JSON).

The wire format is the `k8s\\0` magic, then a `runtime.Unknown` {typeMeta: 1 {apiVersion: 1, kind: 2},
raw: 2, contentEncoding: 3, contentType: 4} whose `raw` is the object's own protobuf message. Only the
kinds below are decoded (ObjectMeta's name, generateName, namespace, labels, annotations, finalizers
and the kind's simple fields); any other kind is answered with 415 like before.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]

MAGIC = b"k8s\x00"


class DecodeError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints, bytes for length-delimited; others skipped."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
            yield num, val
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise DecodeError("truncated field")
            yield num, buf[i : i + n]
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")


def _str(v: int | bytes) -> str:
    if not isinstance(v, bytes):
        raise DecodeError("expected a string")
    return v.decode()


def _map_entry(v: int | bytes) -> tuple[str, bytes]:
    key, val = "", b""
    if not isinstance(v, bytes):
        raise DecodeError("expected a map entry")
    for n, x in fields(v):
        if n == 1:
            key = _str(x)
        elif n == 2 and isinstance(x, bytes):
            val = x
    return key, val


def _object_meta(buf: bytes) -> Obj:
    meta: Obj = {}
    names = {1: "name", 2: "generateName", 3: "namespace"}
    for n, v in fields(buf):
        if n in names:
            if text := _str(v):  # proto2 writes empty strings; JSON leaves them out
                meta[names[n]] = text
        elif n in (11, 12):
            k, val = _map_entry(v)
            meta.setdefault("labels" if n == 11 else "annotations", {})[k] = val.decode()
        elif n == 14:
            meta.setdefault("finalizers", []).append(_str(v))
    return meta


def _string_map(obj: Obj, field: str, v: int | bytes, as_base64: bool = False) -> None:
    k, val = _map_entry(v)
    obj.setdefault(field, {})[k] = base64.b64encode(val).decode() if as_base64 else val.decode()


def _namespace(n: int, v: int | bytes, obj: Obj) -> None:
    if n == 2 and isinstance(v, bytes) and (finalizers := [_str(x) for m, x in fields(v) if m == 1]):
        obj["spec"] = {"finalizers": finalizers}


def _configmap(n: int, v: int | bytes, obj: Obj) -> None:
    if n == 2:
        _string_map(obj, "data", v)
    elif n == 3:
        _string_map(obj, "binaryData", v, as_base64=True)
    elif n == 4:
        obj["immutable"] = bool(v)


def _secret(n: int, v: int | bytes, obj: Obj) -> None:
    if n == 2:
        _string_map(obj, "data", v, as_base64=True)
    elif n == 3 and _str(v):
        obj["type"] = _str(v)
    elif n == 4:
        _string_map(obj, "stringData", v)
    elif n == 5:
        obj["immutable"] = bool(v)


def _serviceaccount(n: int, v: int | bytes, obj: Obj) -> None:
    if n == 4:
        obj["automountServiceAccountToken"] = bool(v)


KINDS: dict[str, Callable[[int, int | bytes, Obj], None]] = {
    "Namespace": _namespace,
    "ConfigMap": _configmap,
    "Secret": _secret,
    "ServiceAccount": _serviceaccount,
}


def decode(data: bytes) -> Obj:
    """The JSON-shaped object in a `k8s\\0` protobuf body; DecodeError for anything else."""
    if not data.startswith(MAGIC):
        raise DecodeError("missing k8s protobuf magic")
    api_version = kind = ""
    raw = b""
    for n, v in fields(data[len(MAGIC) :]):
        if n == 1 and isinstance(v, bytes):
            for m, x in fields(v):
                if m == 1:
                    api_version = _str(x)
                elif m == 2:
                    kind = _str(x)
        elif n == 2 and isinstance(v, bytes):
            raw = v
    handler = KINDS.get(kind)
    if handler is None:
        raise DecodeError(f"protobuf decoding of {kind or 'this kind'} is not supported; send JSON")
    obj: Obj = {"apiVersion": api_version, "kind": kind}
    for n, v in fields(raw):
        if n == 1 and isinstance(v, bytes):
            obj["metadata"] = _object_meta(v)
        else:
            handler(n, v, obj)
    return obj
