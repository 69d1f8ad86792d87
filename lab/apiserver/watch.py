"""Watch streams: newline-delimited JSON events `{"type": ..., "object": ...}` over a chunked response.

resourceVersion semantics follow kube-apiserver:
- unset or "0": one synthetic ADDED per current matching object, then live events;
- "N": the buffered events newer than N, then live events; if the history no longer covers N (or N is
  ahead of the server, e.g. from before a restart that lost writes), one ERROR event carrying a
  Status 410 Expired, then the stream ends;
- sendInitialEvents=true: the current objects as ADDED, then a BOOKMARK annotated
  `k8s.io/initial-events-end: "true"` (bookmarks requested or not), then live events.

Selectors apply to watches like the apiserver's watch cache does: a MODIFIED object that stops
matching is sent as DELETED (with its new state), one that starts matching as ADDED.

With allowWatchBookmarks=true a BOOKMARK (only metadata.resourceVersion set) is sent every
`bookmark_interval` seconds; its resourceVersion is the server's current one, which is safe because
every event up to it has been delivered when the bookmark is written. timeoutSeconds ends the
stream cleanly (terminating chunk) once elapsed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import tables
from .errors import bad_request, status_object
from .resources import ResourceType
from .selectors import FieldSelector, LabelSelector
from .store import Event, Expired

if TYPE_CHECKING:
    from .server import APIServer

Obj = dict[str, Any]


@dataclass(frozen=True)
class Control:
    """Not an event: tells watch streams to end (`cut`, optionally gracefully) or to stop (shutdown)."""

    kind: str
    graceful: bool = True


@dataclass(frozen=True)
class WatchParams:
    rt: ResourceType
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    resource_version: str | None
    bookmarks: bool
    timeout: float | None
    send_initial: bool
    table: bool = False  # objects wrapped in one-row meta.k8s.io Tables (kubectl get -w)

    @classmethod
    def from_query(
        cls,
        rt: ResourceType,
        ns: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        q: Any,
        *,
        table: bool = False,
    ) -> WatchParams:
        timeout = None
        if q.get("timeoutSeconds"):
            try:
                timeout = float(q["timeoutSeconds"])
            except ValueError:
                raise bad_request(f"invalid timeoutSeconds {q['timeoutSeconds']!r}") from None
        rv = q.get("resourceVersion") or None
        if rv not in (None, "0"):
            try:
                int(rv)
            except ValueError:
                raise bad_request(f"invalid resource version {rv!r}") from None
        return cls(
            rt=rt,
            namespace=ns if rt.namespaced else None,
            labels=labels,
            fields=fields,
            resource_version=rv,
            bookmarks=q.get("allowWatchBookmarks") in ("true", "1"),
            timeout=timeout if timeout and timeout > 0 else None,
            send_initial=q.get("sendInitialEvents") == "true",
            table=table,
        )

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        return (
            (self.namespace is None or meta.get("namespace") == self.namespace)
            and self.labels.matches(meta.get("labels"))
            and self.fields.matches(obj)
        )

    def translate(self, ev: Event) -> tuple[str, Obj] | None:
        """The event as this watcher sees it through its selectors, or None."""
        if ev.type == "MODIFIED":
            now, before = self.matches(ev.obj), self.matches(ev.prev)
            if now:
                return ("MODIFIED" if before else "ADDED"), ev.obj
            return ("DELETED", ev.obj) if before else None
        return (ev.type, ev.obj) if self.matches(ev.obj) else None


def _line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


def expired_line(message: str) -> bytes:
    return _line("ERROR", status_object(410, "Expired", message))


async def serve_watch(server: APIServer, request: web.Request, p: WatchParams) -> web.StreamResponse:
    store, rt = server.store, p.rt

    def out(rt: ResourceType, obj: Obj) -> Obj:
        obj = server.api.out(rt, obj)
        return tables.table(rt, [obj]) if p.table else obj

    # Everything up to subscribe() is synchronous, so the snapshot and the live queue line up.
    first: list[bytes] = []
    end_now = False
    if server.faults.take_gone(rt):
        first.append(expired_line("too old resource version (injected fault)"))
        end_now = True
    elif p.send_initial or p.resource_version in (None, "0"):
        for o in store.list_objects(rt.key, p.namespace):
            if p.matches(o):
                first.append(_line("ADDED", out(rt, o)))
        if p.send_initial:
            mark = _bookmark(rt, store.rv)
            mark["metadata"]["annotations"] = {"k8s.io/initial-events-end": "true"}
            first.append(_line("BOOKMARK", mark))
    else:
        try:
            for ev in store.events_since(rt.key, int(p.resource_version)):
                if seen := p.translate(ev):
                    first.append(_line(seen[0], out(rt, seen[1])))
        except Expired as e:
            first.append(expired_line(str(e)))
            end_now = True
    q = store.subscribe(rt.key)
    server.active_watches += 1
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
    )
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        if first:
            await resp.write(b"".join(first))
        if end_now:
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        deadline = loop.time() + p.timeout if p.timeout else None
        interval = server.config.bookmark_interval
        next_mark = loop.time() + interval
        while True:
            now = loop.time()
            if deadline is not None and now >= deadline:
                break
            waits = [deadline - now] if deadline is not None else []
            if p.bookmarks:
                waits.append(max(0.0, next_mark - now))
            try:
                item = await asyncio.wait_for(q.get(), min(waits)) if waits else await q.get()
            except TimeoutError:
                if p.bookmarks and loop.time() >= next_mark:
                    await resp.write(_line("BOOKMARK", _bookmark(rt, store.rv)))
                    next_mark = loop.time() + interval
                continue
            items = [item]
            while not q.empty():
                items.append(q.get_nowait())
            chunk: list[bytes] = []
            stop: Control | None = None
            for it in items:
                if isinstance(it, Control):
                    stop = it
                    break
                if seen := p.translate(it):
                    chunk.append(_line(seen[0], out(rt, seen[1])))
            if chunk:
                await resp.write(b"".join(chunk))
            if stop is not None:
                if not stop.graceful and request.transport is not None:
                    request.transport.abort()  # like a dropped connection: no terminating chunk
                    return resp
                break
        await resp.write_eof()
    except ConnectionError:
        pass  # the client went away
    finally:
        store.unsubscribe(rt.key, q)
        server.active_watches -= 1
    return resp


def _bookmark(rt: ResourceType, rv: int) -> Obj:
    return {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": {"resourceVersion": str(rv)}}
