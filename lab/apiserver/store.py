"""Object storage, the global resourceVersion, per-resource event history and watch fan-out.

Everything here runs on the server's event loop thread; nothing is locked. Stored objects are never
mutated after they are stored (writers store fresh dicts), so events and history entries can share
them with the store and with watch streams.

resourceVersion is one global integer counter, rendered as a string. Every write takes the next
value; a DELETED event carries a new value too, as in kube-apiserver.

Each resource (group/plural) has a ring buffer of its last `history_size` events. A watch from
resourceVersion R replays the buffered events newer than R; if an event newer than R has already
been dropped from the buffer (or R predates the last restart, or is in the future) the watch is
answered with 410 Expired and the client must re-list.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# After loading persisted state the counter jumps by this much, so resourceVersions a client saw from
# writes that never reached the state file (crash between write and save) are never handed out again.
RV_RESTART_GAP = 1000


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED / MODIFIED / DELETED
    obj: Obj
    prev: Obj | None = None  # the previous state, for selector transitions on MODIFIED


class Expired(Exception):
    """The requested resourceVersion is older than the event history (or not valid here)."""


class Store:
    def __init__(self, history_size: int = 1000) -> None:
        self.rv = 0
        self.history_size = max(1, history_size)
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {}
        self.history: dict[str, deque[Event]] = {}
        self.floor: dict[str, int] = {}  # watching from an rv below this is Expired
        self.global_floor = 0  # the floor for every resource after a restart
        self.watchers: dict[str, set[asyncio.Queue[Any]]] = {}
        self.dirty = False

    # --- reads --------------------------------------------------------------------------------

    def get(self, key: str, namespace: str, name: str) -> Obj | None:
        return self.objects.get(key, {}).get((namespace, name))

    def list_objects(self, key: str, namespace: str | None = None) -> list[Obj]:
        bucket = self.objects.get(key, {})
        keys = sorted(k for k in bucket if namespace is None or k[0] == namespace)
        return [bucket[k] for k in keys]

    def keys(self, key: str) -> list[tuple[str, str]]:
        return sorted(self.objects.get(key, {}))

    # --- writes -------------------------------------------------------------------------------

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, key: str, obj: Obj) -> Obj:
        """Store `obj` (a fresh dict) under a new resourceVersion; emits ADDED or MODIFIED."""
        meta = obj["metadata"]
        ident = (meta.get("namespace", ""), meta["name"])
        prev = self.objects.get(key, {}).get(ident)
        rv = self.next_rv()
        meta["resourceVersion"] = str(rv)
        self.objects.setdefault(key, {})[ident] = obj
        self._record(key, Event(rv, "MODIFIED" if prev is not None else "ADDED", obj, prev))
        return obj

    def remove(self, key: str, namespace: str, name: str) -> Obj | None:
        """Delete an object; the DELETED event (and the return value) carry a new resourceVersion."""
        bucket = self.objects.get(key, {})
        old = bucket.pop((namespace, name), None)
        if old is None:
            return None
        rv = self.next_rv()
        gone = {**old, "metadata": {**old["metadata"], "resourceVersion": str(rv)}}
        self._record(key, Event(rv, "DELETED", gone, old))
        return gone

    def drop_resource(self, key: str) -> list[Obj]:
        """Delete every object of a resource (its CRD went away)."""
        return [o for ns, name in self.keys(key) if (o := self.remove(key, ns, name)) is not None]

    def _record(self, key: str, ev: Event) -> None:
        ring = self.history.get(key)
        if ring is None:
            ring = self.history[key] = deque()
        if len(ring) >= self.history_size:
            self.floor[key] = ring.popleft().rv
        ring.append(ev)
        self.dirty = True
        for q in self.watchers.get(key, ()):
            q.put_nowait(ev)

    # --- watch support ------------------------------------------------------------------------

    def subscribe(self, key: str) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.watchers.setdefault(key, set()).add(q)
        return q

    def unsubscribe(self, key: str, q: asyncio.Queue[Any]) -> None:
        self.watchers.get(key, set()).discard(q)

    def broadcast(self, item: Any) -> int:
        """Put a control item (e.g. a cut marker) on every watch queue; returns the number of watches."""
        n = 0
        for qs in self.watchers.values():
            for q in qs:
                q.put_nowait(item)
                n += 1
        return n

    def events_since(self, key: str, rv: int) -> list[Event]:
        """Buffered events of `key` newer than `rv`, or Expired if some of them are gone."""
        floor = max(self.floor.get(key, 0), self.global_floor)
        if rv < floor or rv > self.rv:
            raise Expired(f"too old resource version: {rv} ({floor})")
        return [e for e in self.history.get(key, ()) if e.rv > rv]

    def trim_history(self, key: str | None = None) -> None:
        """Forget buffered events (all resources, or one): watches from older versions get 410."""
        for k in [key] if key is not None else list(self.history):
            ring = self.history.get(k)
            if ring:
                self.floor[k] = max(self.floor.get(k, 0), ring[-1].rv)
                ring.clear()
        if key is None:
            self.global_floor = self.rv

    def oldest_watchable(self, key: str) -> int:
        return max(self.floor.get(key, 0), self.global_floor)

    # --- persistence --------------------------------------------------------------------------

    def dump(self) -> Obj:
        return {
            "resourceVersion": self.rv,
            "objects": {k: [b[i] for i in sorted(b)] for k, b in sorted(self.objects.items()) if b},
        }

    def save(self, path: str) -> None:
        data = json.dumps(self.dump(), separators=(",", ":"), sort_keys=True)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".apiserver-state-", dir=d)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.dirty = False

    def load(self, data: Obj) -> None:
        """Replace the contents from `dump()` output. History starts empty: older watches get 410."""
        self.objects = {}
        for key, objs in data.get("objects", {}).items():
            bucket = self.objects.setdefault(key, {})
            for o in objs:
                bucket[(o["metadata"].get("namespace", ""), o["metadata"]["name"])] = o
        self.rv = int(data.get("resourceVersion", 0)) + RV_RESTART_GAP
        self.history = {}
        self.floor = {}
        self.global_floor = self.rv
        self.dirty = False
