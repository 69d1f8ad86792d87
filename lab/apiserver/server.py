"""The server object: configuration, startup/shutdown, persistence, and a background-thread runner.

`APIServer` lives on an asyncio loop (`await start()` / `await stop()`); `APIServerThread` gives it a
thread and loop of its own for synchronous callers (tests, the lab CLI) and exposes the fault
controls as plain methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from aiohttp import web

from . import kubernetes_service, semantics
from .allocators import ClusterIPAllocator, NodePortAllocator
from .errors import bad_request
from .faults import Faults
from .handlers import SERVER_KEY, handle, middleware
from .resources import CRD_KEY, Registry
from .rest import API
from .store import Store
from .watch import Control

log = logging.getLogger("pycilium.lab.apiserver")

T = TypeVar("T")

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    state_file: str | None = None  # load at start, save (debounced) after writes and at stop
    service_cidr: str = "10.96.0.0/12"
    node_port_range: tuple[int, int] = (30000, 32767)
    history_size: int = 1000  # watch events kept per resource
    bookmark_interval: float = 5.0  # seconds between BOOKMARK events on watches that asked for them
    save_delay: float = 0.2  # seconds to coalesce writes before saving the state file
    graceful_pod_deletion: bool = False  # Pods bound to a node get deletionTimestamp, kubelet deletes
    namespaces: tuple[str, ...] = field(default=DEFAULT_NAMESPACES)  # created at start if missing
    # Where clients reach this server (kube-apiserver's --advertise-address): with an address, the
    # `default/kubernetes` Service and its endpoints point there (kubernetes_service.py). The port
    # defaults to the bound one.
    advertise_address: str | None = None
    advertise_port: int = 0
    kubernetes_service_interval: float = 10.0  # seconds between repairs of `default/kubernetes`


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class APIServer:
    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or ServerConfig(), **overrides)
        self.store = Store(self.config.history_size)
        self.registry = Registry.with_builtins()
        lo, hi = self.config.node_port_range
        self.api = API(
            self.store,
            self.registry,
            ClusterIPAllocator(self.config.service_cidr),
            NodePortAllocator(lo, hi),
            graceful_pod_deletion=self.config.graceful_pod_deletion,
        )
        self.faults = Faults(self._cut_watches, self._trim_history)
        self.active_watches = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._repair: asyncio.Task[None] | None = None
        self.advertised: tuple[str, int] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[middleware], client_max_size=64 * 1024 * 1024)
        app[SERVER_KEY] = self
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def start(self) -> str:
        """Load state, bind and serve; returns the base URL (http://host:port)."""
        self._loop = asyncio.get_running_loop()
        self._load_state()
        for ns in self.config.namespaces:
            self.api.ensure_namespace(ns)
        sock = _bind(self.config.host, self.config.port)
        host, port = sock.getsockname()[:2]
        if self.config.advertise_address:
            self.advertised = (self.config.advertise_address, self.config.advertise_port or port)
            self.repair_kubernetes_service()  # before serving: nobody else can take its ClusterIP
            self._repair = asyncio.create_task(self._repair_loop())
        # handler_cancellation: a watch whose client went away is cancelled at once instead of lingering
        # until its next write fails.
        runner = web.AppRunner(
            self.build_app(), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.after_request()
        log.info("API server listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._repair is not None:
            self._repair.cancel()
            self._repair = None
        self.store.broadcast(Control("stop"))
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        self.save_state()

    # --- the kubernetes Service ---------------------------------------------------------------

    def repair_kubernetes_service(self) -> list[str]:
        """Create or repair `default/kubernetes` (nothing without an advertise address)."""
        if self.advertised is None:
            return []
        address, port = self.advertised
        done = kubernetes_service.reconcile(self.api, self.config.service_cidr, address, port)
        if done:
            self.after_request()
        return done

    async def _repair_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.kubernetes_service_interval)
            try:
                self.repair_kubernetes_service()
            except Exception:
                log.exception("repairing the kubernetes Service failed")

    # --- persistence --------------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.config.state_file
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            self.store.load(json.load(f))
        for crd in self.store.list_objects(CRD_KEY):
            self.registry.register_crd(crd)
        semantics.rebuild_allocations(self.api)
        log.info("loaded %s (resourceVersion %d)", path, self.store.rv)

    def save_state(self) -> None:
        if self.config.state_file and self.store.dirty:
            self.store.save(self.config.state_file)

    def after_request(self) -> None:
        """Called after every request: schedule a coalesced save if something was written."""
        if not (self.config.state_file and self.store.dirty) or self._save_handle is not None:
            return
        loop = self._loop or asyncio.get_running_loop()

        def save() -> None:
            self._save_handle = None
            try:
                self.save_state()
            except OSError:
                log.exception("saving %s failed", self.config.state_file)

        self._save_handle = loop.call_later(self.config.save_delay, save)

    # --- faults -------------------------------------------------------------------------------

    def _cut_watches(self, graceful: bool) -> int:
        return self.store.broadcast(Control("cut", graceful=graceful))

    def _trim_history(self, resource: str | None) -> None:
        if resource is None:
            self.store.trim_history()
            return
        rt = self.registry.find(resource)
        if rt is None:
            raise bad_request(f"unknown resource {resource!r}")
        self.store.trim_history(rt.key)


class APIServerThread:
    """An `APIServer` on a daemon thread with its own event loop.

    >>> srv = APIServerThread(history_size=50)
    >>> url = srv.start()          # http://127.0.0.1:<port>
    >>> srv.force_gone("pods")     # fault controls, safe to call from any thread
    >>> srv.stop()
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.server = APIServer(config, **overrides)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> str:
        started: concurrent.futures.Future[str] = concurrent.futures.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                started.set_result(loop.run_until_complete(self.server.start()))
            except BaseException as e:
                started.set_exception(e)
                loop.close()
                return
            loop.run_forever()
            loop.run_until_complete(self.server.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="pycilium-apiserver", daemon=True)
        self._thread.start()
        self.url = started.result(timeout)
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop = None
        self._thread = None

    def __enter__(self) -> APIServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` on the server's loop thread (where the store may be touched) and return its result."""
        if self._loop is None:
            raise RuntimeError("server not running")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
            self.server.after_request()  # persist whatever `fn` wrote

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    # fault injection (see faults.py for what each does)
    def cut_watches(self, graceful: bool = False) -> int:
        return self.call(lambda: self.server.faults.cut_watches(graceful))

    def set_delay(self, ms: int) -> None:
        self.call(lambda: self.server.faults.set_delay(ms))

    def force_gone(self, resource: str | None = None, count: int = 1) -> None:
        self.call(lambda: self.server.faults.force_gone(resource, count))

    def refuse(self, seconds: float, mode: str = "close", cut_watches: bool = True) -> None:
        self.call(lambda: self.server.faults.refuse(seconds, mode, cut_watches))

    def trim_history(self, resource: str | None = None) -> None:
        self.call(lambda: self.server.faults.trim_history(resource))

    def clear_faults(self) -> None:
        self.call(self.server.faults.clear)

    @property
    def resource_version(self) -> int:
        return self.call(lambda: self.server.store.rv)

    @property
    def active_watches(self) -> int:
        return self.call(lambda: self.server.active_watches)
