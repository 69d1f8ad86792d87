"""A reflector per resource: list, then watch, forever, feeding handlers with compact raw dicts.

Why our own and not `kubernetes.informer` or `watch.Watch`: the datapath agent needs pagination,
watch bookmarks, a re-list that *diffs* against what it has seen (so deletes that happened while it
was not watching are not lost), backoff that never gives up, and plain dicts instead of model objects
(memory). The official client is used for transport, auth and TLS only (see client.py).

Threading model: each Reflector runs in its own daemon thread with the synchronous client; handlers
are called on that thread, one event at a time, in resourceVersion order. Handlers must be quick
(record the change and wake a worker); they are exception-isolated: a handler that raises is logged
with the object's kind/namespace/name and the event is skipped, the reflector keeps going.

Lifecycle of one reflector:
1. List (`limit` per page, following `continue`); a 410 on a continue token restarts the list.
   Each listed object is compared with the cache: new -> ADDED, changed resourceVersion -> MODIFIED;
   cached objects absent from the list -> DELETED (synthesized). Then `synced` is set (once).
2. Watch from the list's resourceVersion with allowWatchBookmarks and a jittered timeoutSeconds.
   Every event advances the resourceVersion; BOOKMARKs only advance it. A watch that ends cleanly
   (timeout) is re-opened at once from the last resourceVersion.
3. ERROR 410 Expired (normal after a few idle minutes or after an API server restart): re-list (1).
4. Any other error or a dropped connection: wait with exponential backoff and full jitter, then
   re-watch from the last resourceVersion (which may in turn answer 410). The cache and every
   consumer keep their state meanwhile: nothing is cleared on disconnect, so the datapath keeps
   forwarding with what it has.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client as k8s_client

from .client import APIError, open_request, request_json
from .resources import Resource

log = logging.getLogger("pycilium.k8s.reflector")

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
Transform = Callable[[Obj], Obj | None]

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"

_DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


def compact(obj: Obj) -> Obj:
    """The default transform: drop what no consumer reads and what costs the most memory."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        ann = meta.get("annotations")
        if ann:
            for k in _DROP_ANNOTATIONS:
                ann.pop(k, None)
            if not ann:
                meta.pop("annotations", None)
    return obj


def obj_key(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def obj_rv(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def describe(kind: str, obj: Obj | None) -> str:
    if not obj:
        return kind
    ns, name = obj_key(obj)
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


@dataclass
class Handlers:
    """Callbacks for one consumer. on_update gets (old, new); any may be None."""

    on_add: Callable[[Obj], None] | None = None
    on_update: Callable[[Obj, Obj], None] | None = None
    on_delete: Callable[[Obj], None] | None = None


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [base/2, min(cap, base*2**n)]."""

    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0

    def next(self) -> float:
        hi = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(min(self.base / 2, hi), hi)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class ReflectorStats:
    lists: int = 0
    relists_410: int = 0
    watches: int = 0
    watch_errors: int = 0
    events: int = 0
    bookmarks: int = 0
    synthesized_deletes: int = 0
    handler_errors: int = 0
    last_error: str = ""
    backoff_waits: list[float] = field(default_factory=list)


class _Stopped(Exception):
    """stop() was called in the middle of a list: the partial list must not be diffed."""


class _Gone(Exception):
    """The watch answered 410 Expired: the resourceVersion is too old, re-list."""


class HasSynced(Protocol):
    synced: threading.Event


class Reflector:
    """List+watch one resource into a cache of compact dicts and call handlers with every change."""

    def __init__(
        self,
        api: k8s_client.ApiClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        transform: Transform | None = compact,
        handlers: Iterable[Handlers] = (),
        page_size: int = 500,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        backoff: Backoff | None = None,
        request_timeout: float = 60.0,
        store_objects: bool = True,
        name: str | None = None,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.transform = transform
        self.handlers: list[Handlers] = list(handlers)
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.name = name or resource.qualified
        self.synced = threading.Event()
        self.stats = ReflectorStats()
        self.resource_version = ""
        # resourceVersion of every object seen (for re-list diffs); the objects themselves only with
        # store_objects (consumers that keep their own parsed state need not pay for a second copy).
        self._rvs: dict[Key, str] = {}
        self._objs: dict[Key, Obj] | None = {} if store_objects else None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None  # the open watch response, so stop() can interrupt a blocking read

    # --- public -------------------------------------------------------------------------------

    def add_handlers(self, handlers: Handlers) -> None:
        """Add a consumer; must be called before start() (it would miss the initial list otherwise)."""
        self.handlers.append(handlers)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:
                try:
                    resp.close()
                except Exception:
                    pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    def get(self, namespace: str, name: str) -> Obj | None:
        """The cached (transformed) object; None when unknown or when objects are not stored."""
        with self._lock:
            return self._objs.get((namespace, name)) if self._objs is not None else None

    def objects(self) -> list[Obj]:
        with self._lock:
            return list(self._objs.values()) if self._objs is not None else []

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._rvs)

    def __len__(self) -> int:
        return len(self._rvs)

    # --- loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                    self.backoff.reset()
                started = time.monotonic()
                got = self._watch()
                # A watch that ends at once with nothing in it (a server closing streams early) must
                # not turn into a busy loop.
                if got == 0 and time.monotonic() - started < 1.0:
                    self._sleep(self.backoff.next())
                else:
                    self.backoff.reset()
            except _Gone:
                self.stats.relists_410 += 1
                log.info("%s: resourceVersion %s expired (410), re-listing", self.name, self.resource_version)
                need_list = True
            except Exception as e:
                if self._stop.is_set():
                    break
                self.stats.watch_errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                wait = self.backoff.next()
                self.stats.backoff_waits.append(wait)
                del self.stats.backoff_waits[:-50]
                log.warning("%s: %s; retrying in %.2fs (keeping %d cached objects)",
                            self.name, self.stats.last_error, wait, len(self._rvs))  # fmt: skip
                self._sleep(wait)
        self._resp = None

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _query(self) -> list[tuple[str, Any]]:
        q: list[tuple[str, Any]] = []
        if self.label_selector:
            q.append(("labelSelector", self.label_selector))
        if self.field_selector:
            q.append(("fieldSelector", self.field_selector))
        return q

    def _path(self) -> str:
        return self.resource.path(self.namespace)

    # --- list ---------------------------------------------------------------------------------

    def _list(self) -> None:
        """Full paginated list, diffed against the cache."""
        self.stats.lists += 1
        while True:
            try:
                seen, rv = self._list_pages()
                break
            except APIError as e:
                if e.status == 410:  # continue token expired mid-list: start over
                    log.info("%s: list continue token expired, restarting the list", self.name)
                    continue
                raise
        with self._lock:
            gone = [k for k in self._rvs if k not in seen]
        for k in gone:
            with self._lock:
                old_rv = self._rvs.pop(k, None)
                old = self._objs.pop(k, None) if self._objs is not None else None
            if old_rv is not None:
                self.stats.synthesized_deletes += 1
                self._dispatch(DELETED, old or self._stub(k, old_rv), None)
        self.resource_version = rv
        if not self.synced.is_set():
            log.info("%s: synced (%d objects, resourceVersion %s)", self.name, len(self._rvs), rv)
            self.synced.set()

    def _list_pages(self) -> tuple[set[Key], str]:
        seen: set[Key] = set()
        cont = ""
        rv = ""
        while True:
            q = self._query()
            if self.page_size:
                q.append(("limit", self.page_size))
            if cont:
                q.append(("continue", cont))
            page = request_json(self.api, "GET", self._path(), query=q,
                                timeout=(10.0, self.request_timeout))  # fmt: skip
            meta = page.get("metadata") or {}
            if not rv:
                rv = str(meta.get("resourceVersion") or "")
            items = page.get("items") or []
            kind = self.resource.kind
            for raw in items:
                raw.setdefault("kind", kind)
                seen.add(obj_key(raw))
                self._apply(ADDED, raw, from_list=True)
            del items, page
            cont = str(meta.get("continue") or "")
            if not cont:
                return seen, rv
            if self._stop.is_set():
                raise _Stopped()

    # --- watch --------------------------------------------------------------------------------

    def _watch(self) -> int:
        """One watch request; returns the number of events seen. Raises _Gone on 410."""
        lo, hi = self.watch_timeout
        timeout = int(random.uniform(lo, hi)) or 1
        q = self._query()
        q += [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", timeout)]
        if self.resource_version:
            q.append(("resourceVersion", self.resource_version))
        self.stats.watches += 1
        # The read timeout covers a peer that vanished without closing the connection.
        try:
            resp = open_request(self.api, "GET", self._path(), query=q, timeout=(10.0, timeout + 30.0))
        except APIError as e:
            if e.status == 410:  # some servers answer the watch request itself with 410 Gone
                raise _Gone(e.message) from e
            raise
        self._resp = resp
        n = 0
        try:
            if self._stop.is_set():
                return 0
            for line in _lines(resp):
                if self._stop.is_set():
                    break
                n += 1
                self._handle_line(line)
        finally:
            self._resp = None
            try:
                resp.release_conn()
            except Exception:
                pass
        return n

    def _handle_line(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            log.warning("%s: undecodable watch line skipped: %r", self.name, line[:200])
            return
        etype = ev.get("type")
        obj = ev.get("object")
        if not isinstance(obj, dict):
            log.warning("%s: watch event without object skipped: %r", self.name, line[:200])
            return
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone(obj.get("message", ""))
            raise APIError(int(code or 0), str(obj.get("reason") or ""), str(obj.get("message") or ""), obj)
        rv = obj_rv(obj)
        if etype == "BOOKMARK":
            self.stats.bookmarks += 1
            if rv:
                self.resource_version = rv
            return
        if etype not in (ADDED, MODIFIED, DELETED):
            log.warning("%s: unknown watch event type %r skipped", self.name, etype)
            return
        self.stats.events += 1
        obj.setdefault("kind", self.resource.kind)
        self._apply(etype, obj, from_list=False)
        if rv:
            self.resource_version = rv

    # --- cache + dispatch ---------------------------------------------------------------------

    def _apply(self, etype: str, raw: Obj, *, from_list: bool) -> None:
        key = obj_key(raw)
        rv = obj_rv(raw)
        try:
            obj = self.transform(raw) if self.transform is not None else raw
        except Exception:
            self.stats.handler_errors += 1
            log.exception("%s: cannot read %s; skipped", self.name, describe(self.resource.kind, raw))
            return
        with self._lock:
            old_rv = self._rvs.get(key)
            old = self._objs.get(key) if self._objs is not None else None
            if etype == DELETED or obj is None:  # a transform returning None filters the object out
                if old_rv is None:
                    return
                del self._rvs[key]
                if self._objs is not None:
                    self._objs.pop(key, None)
                etype = DELETED
            else:
                if old_rv is not None and rv and old_rv == rv:
                    return  # already seen (re-list, or a watch replaying what a list returned)
                self._rvs[key] = rv
                if self._objs is not None:
                    self._objs[key] = obj
                etype = ADDED if old_rv is None else MODIFIED
        if etype == DELETED:
            self._dispatch(DELETED, obj if obj is not None else (old or self._stub(key, old_rv)), None)
        else:
            self._dispatch(etype, obj, old)

    def _stub(self, key: Key, rv: str | None) -> Obj:
        meta: Obj = {"name": key[1], "resourceVersion": rv or ""}
        if key[0]:
            meta["namespace"] = key[0]
        return {"kind": self.resource.kind, "metadata": meta}

    def _dispatch(self, etype: str, obj: Obj | None, old: Obj | None) -> None:
        if obj is None:
            return
        for h in self.handlers:
            try:
                if etype == ADDED and h.on_add is not None:
                    h.on_add(obj)
                elif etype == MODIFIED:
                    if h.on_update is not None:
                        h.on_update(old or {}, obj)
                elif etype == DELETED and h.on_delete is not None:
                    h.on_delete(obj)
            except Exception:
                self.stats.handler_errors += 1
                log.exception("%s: handler failed on %s of %s; skipped",
                              self.name, etype, describe(self.resource.kind, obj))  # fmt: skip


def _lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited records of a streamed (chunked) response, as they arrive."""
    buf = b""
    if getattr(resp, "chunked", False):
        chunks: Iterable[bytes] = resp.stream(amt=65536, decode_content=True)
    else:  # not chunked: read what is there instead of waiting for a full buffer
        chunks = iter(lambda: resp.read1(65536), b"")
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        if b"\n" not in chunk:
            continue
        *complete, buf = buf.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def wait_for_sync(reflectors: Iterable[HasSynced], timeout: float | None = None) -> bool:
    """Wait until every reflector has completed its first full list."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for r in reflectors:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not r.synced.wait(left):
            return False
    return True
