"""Typed access to pinned BPF maps: the spec of each map and a handle over the raw syscalls."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from pycilium.bpf import syscall as sc

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


class MapNotPinnedError(FileNotFoundError):
    """The map is not pinned: the agent has not run on this node (or the bpf root is wrong)."""


@dataclass(frozen=True)
class MapSpec(Generic[K, V]):
    """One map of the datapath: its pin name, kernel type, layout and sizing."""

    name: str
    map_type: int
    key: type[K]
    value: type[V]
    size_define: str  # -D name the C side uses for max_entries
    default_size: int
    config_field: str | None = None  # AgentConfig field that overrides the size
    flags: int = 0  # map_flags at creation (BPF_F_NO_PREALLOC for LPM tries)

    @property
    def percpu(self) -> bool:
        return self.map_type in sc.PERCPU_TYPES

    def create(self, max_entries: int | None = None) -> int:
        """Create the map in the kernel (not pinned); returns its fd."""
        n = self.default_size if max_entries is None else max_entries
        if n == 0:  # per-CPU slots (perf event arrays)
            n = sc.possible_cpus()
        return sc.map_create(self.map_type, ctypes.sizeof(self.key), ctypes.sizeof(self.value), n,
                             self.name[:15], self.flags)  # fmt: skip

    def size_for(self, config: object | None) -> int:
        if config is not None and self.config_field:
            return int(getattr(config, self.config_field))
        return self.default_size or sc.possible_cpus()


class PinnedMap(Generic[K, V]):
    """A pinned map opened by path. Keys and values are the spec's ctypes structures."""

    def __init__(self, spec: MapSpec[K, V], bpf_root: str | os.PathLike[str]):
        self.spec = spec
        self.path = str(Path(bpf_root) / spec.name)
        try:
            self.fd = sc.obj_get(self.path)
        except sc.BPFError as e:
            if e.errno == 2:
                raise MapNotPinnedError(
                    f"map {spec.name} is not pinned at {self.path}: is the agent running on this node?"
                ) from None
            raise
        self.info = sc.map_info(self.fd)
        ks, vs = ctypes.sizeof(spec.key), ctypes.sizeof(spec.value)
        if self.info.key_size != ks or self.info.value_size != vs:
            os.close(self.fd)
            raise ValueError(
                f"map {self.path} has key/value size {self.info.key_size}/{self.info.value_size}, "
                f"this pycilium expects {ks}/{vs}: layout mismatch (restart the agent to migrate)"
            )
        self._ncpu = sc.possible_cpus() if spec.percpu else 1
        self._vstride = (vs + 7) & ~7

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- single elements -------------------------------------------------------------------------
    def _value_size(self) -> int:
        return self._vstride * self._ncpu if self.spec.percpu else self.info.value_size

    def lookup(self, key: K) -> V | None:
        raw = sc.map_lookup(self.fd, bytes(key), self._value_size())
        return None if raw is None else self.spec.value.from_buffer_copy(raw[: self.info.value_size])

    def lookup_percpu(self, key: K) -> list[V] | None:
        raw = sc.map_lookup(self.fd, bytes(key), self._value_size())
        return None if raw is None else self._split_percpu(raw)

    def update(self, key: K, value: V, flags: int = sc.BPF_ANY) -> None:
        raw = bytes(value)
        if self.spec.percpu:
            raw = raw.ljust(self._vstride, b"\0") * self._ncpu
        sc.map_update(self.fd, bytes(key), raw, flags)

    def delete(self, key: K) -> bool:
        return sc.map_delete(self.fd, bytes(key))

    # -- whole map -------------------------------------------------------------------------------
    def _split_percpu(self, raw: bytes) -> list[V]:
        n = self.info.value_size
        return [self.spec.value.from_buffer_copy(raw[i * self._vstride : i * self._vstride + n])
                for i in range(self._ncpu)]  # fmt: skip

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        return sc.map_items(self.fd, self.info)

    def items(self) -> Iterator[tuple[K, V]]:
        kcls, vcls = self.spec.key, self.spec.value
        for k, v in sc.map_items(self.fd, self.info):
            yield kcls.from_buffer_copy(k), vcls.from_buffer_copy(v[: self.info.value_size])

    def items_percpu(self) -> Iterator[tuple[K, list[V]]]:
        for k, v in sc.map_items(self.fd, self.info):
            yield self.spec.key.from_buffer_copy(k), self._split_percpu(v)

    def keys(self) -> Iterator[K]:
        for k, _ in sc.map_items(self.fd, self.info):
            yield self.spec.key.from_buffer_copy(k)

    def update_batch(self, pairs: Iterable[tuple[K, V]], flags: int = sc.BPF_ANY) -> int:
        keys: list[bytes] = []
        values: list[bytes] = []
        for k, v in pairs:
            keys.append(bytes(k))
            raw = bytes(v)
            if self.spec.percpu:
                raw = raw.ljust(self._vstride, b"\0") * self._ncpu
            values.append(raw)
        if self.info.type == sc.MAP_TYPE_LPM_TRIE:
            for kb, vb in zip(keys, values, strict=True):
                sc.map_update(self.fd, kb, vb, flags)
        else:
            for i in range(0, len(keys), 8192):
                sc.map_update_batch(self.fd, keys[i : i + 8192], values[i : i + 8192], flags)
        return len(keys)

    def delete_batch(self, keys: Iterable[K]) -> int:
        raw = [bytes(k) for k in keys]
        if self.info.type == sc.MAP_TYPE_LPM_TRIE:
            return sum(1 for k in raw if sc.map_delete(self.fd, k))
        return sc.map_delete_batch(self.fd, raw)

    def count(self) -> int:
        return sum(1 for _ in sc.map_items(self.fd, self.info))

    def clear(self) -> int:
        if self.info.type in (sc.MAP_TYPE_ARRAY, sc.MAP_TYPE_PERCPU_ARRAY):  # elements cannot be deleted
            zero = self.spec.value()
            keys = list(self.keys())
            self.update_batch((k, zero) for k in keys)
            return len(keys)
        return self.delete_batch(list(self.keys()))
