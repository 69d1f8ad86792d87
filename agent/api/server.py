"""The agent's gRPC API server on its root-only unix socket.

Two ways to run it, same servicer:

* ``await start_server(provider, socket_path)`` in the agent's own asyncio loop (grpc.aio); provider
  methods then run on that loop, so agent state needs no locking. ``await server.stop()``.
* ``serve(provider, socket_path)`` starts the same server on a private event loop in a daemon thread
  and returns a handle with ``stop()``; provider methods run on that thread.

Use one of them per process (grpc.aio is happiest with a single event loop).

The socket is created with mode 0600. Its parent directory is created with mode 0700 when missing
(an existing directory is left as it is: it may be shared, e.g. /var/run/pycilium). A stale socket
file is replaced; a socket another live server answers on is not (two agents on one node is an
error, not something to paper over).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio
from pycilium.agent.api import provider as p
from pycilium.agent.api import pycilium_pb2 as pb
from pycilium.agent.api import pycilium_pb2_grpc as pb_grpc

log = logging.getLogger("pycilium.agent.api")

T = TypeVar("T")
ServicerHook = Callable[[aio.Server], None]  # registers more servicers on the same server


class ApiServerError(RuntimeError):
    """The API server could not start (socket in use, unwritable directory, ...)."""


# ---- dataclass -> message -------------------------------------------------------------------------


def _component(c: p.ComponentStatus | None) -> pb.ComponentStatus | None:
    return None if c is None else pb.ComponentStatus(state=c.state, message=c.message)


def ipam_to_pb(i: p.IPAMInfo) -> pb.IPAMStatus:
    return pb.IPAMStatus(cidr=i.cidr, capacity=i.capacity, allocations=dict(i.allocations))


def status_to_pb(s: p.StatusInfo) -> pb.StatusResponse:
    kpr = s.kube_proxy_replacement
    m = s.masquerading
    msg = pb.StatusResponse(
        node_name=s.node_name,
        node_ip=s.node_ip,
        version=s.version,
        agent=_component(s.agent),
        kubernetes=_component(s.kubernetes),
        kube_proxy_replacement=pb.KubeProxyReplacement(
            enabled=kpr.enabled,
            devices=list(kpr.devices),
            direct_routing_device=kpr.direct_routing_device,
            mode=kpr.mode,
            details=dict(kpr.details),
        ),
        cni_config_path=s.cni_config_path,
        cni=_component(s.cni),
        masquerading=pb.Masquerading(enabled=m.enabled, mode=m.mode, devices=list(m.devices), cidr=m.cidr),
        routing_mode=s.routing_mode,
        controllers=[
            pb.Controller(
                name=c.name,
                healthy=c.healthy,
                success_count=c.success_count,
                failure_count=c.failure_count,
                last_error=c.last_error,
                last_success_unix=c.last_success_unix,
                last_failure_unix=c.last_failure_unix,
            )
            for c in s.controllers
        ],
        datapath=_component(s.datapath),
        uptime_seconds=s.uptime_seconds,
    )
    if s.ipam is not None:
        msg.ipam.CopyFrom(ipam_to_pb(s.ipam))
    if s.cluster_health is not None:
        msg.cluster_health.CopyFrom(_component(s.cluster_health))
    return msg


def service_to_pb(s: p.ServiceInfo) -> pb.Service:
    return pb.Service(
        id=s.id,
        frontend_ip=s.frontend_ip,
        frontend_port=s.frontend_port,
        protocol=s.protocol,
        type=s.type,
        backends=[
            pb.Backend(
                id=b.id, ip=b.ip, port=b.port, protocol=b.protocol, state=b.state, node_name=b.node_name
            )
            for b in s.backends
        ],
        name=s.name,
        namespace=s.namespace,
        external_traffic_policy=s.external_traffic_policy,
        internal_traffic_policy=s.internal_traffic_policy,
        session_affinity_timeout=s.session_affinity_timeout,
    )


def endpoint_to_pb(e: p.EndpointInfo) -> pb.Endpoint:
    return pb.Endpoint(
        id=e.id,
        identity=e.identity,
        labels=list(e.labels),
        ipv4=e.ipv4,
        ingress_enforced=e.ingress_enforced,
        egress_enforced=e.egress_enforced,
        state=e.state,
        pod_name=e.pod_name,
        namespace=e.namespace,
        container_id=e.container_id,
        ifname=e.ifname,
        ifindex=e.ifindex,
        mac=e.mac,
        netns=e.netns,
    )


def identity_to_pb(i: p.IdentityInfo) -> pb.Identity:
    return pb.Identity(id=i.id, labels=list(i.labels))


# ---- servicer -----------------------------------------------------------------------------------


class AgentServicer(pb_grpc.AgentServicer):
    """Answers every RPC from an AgentStateProvider."""

    def __init__(self, provider: p.AgentStateProvider):
        self.provider = provider

    async def _call(self, context: aio.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        code: grpc.StatusCode | None = None
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result
        except LookupError as e:
            code, text = grpc.StatusCode.NOT_FOUND, str(e) or "not found"
        except ValueError as e:
            code, text = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except NotImplementedError as e:
            code, text = grpc.StatusCode.UNIMPLEMENTED, str(e) or f"{fn.__name__} is not implemented"
        except Exception as e:
            log.exception("API call failed", extra={"method": getattr(fn, "__name__", "?")})
            code, text = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        await context.abort(code, text)

    async def Status(self, request: pb.StatusRequest, context: aio.ServicerContext) -> pb.StatusResponse:
        return status_to_pb(await self._call(context, self.provider.status, bool(request.verbose)))

    async def ListServices(
        self, request: pb.ListServicesRequest, context: aio.ServicerContext
    ) -> pb.ListServicesResponse:
        services = await self._call(context, self.provider.list_services)
        return pb.ListServicesResponse(services=[service_to_pb(s) for s in services])

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: aio.ServicerContext
    ) -> pb.ListEndpointsResponse:
        endpoints = await self._call(context, self.provider.list_endpoints)
        return pb.ListEndpointsResponse(endpoints=[endpoint_to_pb(e) for e in endpoints])

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: aio.ServicerContext) -> pb.Endpoint:
        ep = await self._call(context, self.provider.get_endpoint, int(request.id))
        if ep is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"endpoint {request.id} not found")
        return endpoint_to_pb(ep)

    async def DeleteEndpoint(
        self, request: pb.DeleteEndpointRequest, context: aio.ServicerContext
    ) -> pb.DeleteEndpointResponse:
        deleted = await self._call(context, self.provider.delete_endpoint, int(request.id))
        return pb.DeleteEndpointResponse(deleted=bool(deleted))

    async def ListIdentities(
        self, request: pb.ListIdentitiesRequest, context: aio.ServicerContext
    ) -> pb.ListIdentitiesResponse:
        identities = await self._call(context, self.provider.list_identities)
        return pb.ListIdentitiesResponse(identities=[identity_to_pb(i) for i in identities])

    async def GetIdentity(self, request: pb.GetIdentityRequest, context: aio.ServicerContext) -> pb.Identity:
        ident = await self._call(context, self.provider.get_identity, int(request.id))
        if ident is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"identity {request.id} not found")
        return identity_to_pb(ident)

    async def GetIPAM(self, request: pb.GetIPAMRequest, context: aio.ServicerContext) -> pb.IPAMStatus:
        return ipam_to_pb(await self._call(context, self.provider.ipam))


# ---- socket -------------------------------------------------------------------------------------


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def prepare_socket_path(socket_path: str) -> None:
    """Create the parent directory (0700) and remove a stale socket; refuse a live one."""
    path = Path(socket_path)
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiServerError(f"{socket_path} exists and is not a socket; refusing to replace it")
    if _socket_answers(socket_path):
        raise ApiServerError(f"another server is already listening on {socket_path}: is an agent running?")
    path.unlink()


# ---- running ------------------------------------------------------------------------------------


class ApiServer:
    """A started grpc.aio server bound to the unix socket (runs on the loop that started it)."""

    def __init__(self, server: aio.Server, socket_path: str):
        self.server = server
        self.socket_path = socket_path
        self._ino = os.stat(socket_path).st_ino

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._ino:  # still ours
                os.unlink(self.socket_path)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    provider: p.AgentStateProvider, socket_path: str, *, extra_servicers: Sequence[ServicerHook] = ()
) -> ApiServer:
    """Start the API server on `socket_path` in the running event loop."""
    prepare_socket_path(socket_path)
    server = aio.server()
    pb_grpc.add_AgentServicer_to_server(AgentServicer(provider), server)
    for hook in extra_servicers:
        hook(server)
    target = "unix:" + os.path.abspath(socket_path)
    try:
        server.add_insecure_port(target)
    except RuntimeError as e:
        raise ApiServerError(f"cannot listen on {socket_path}: {e}") from e
    os.chmod(socket_path, 0o600)
    await server.start()
    log.info("API server listening", extra={"socket": socket_path})
    return ApiServer(server, socket_path)


class ServerHandle:
    """The API server running on its own event loop in a daemon thread."""

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: ApiServer | None = None
        self._stopped = False

    def _run(
        self, ready: threading.Event, errors: list[BaseException], starter: Awaitable[ApiServer]
    ) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(starter)
        except BaseException as e:
            errors.append(e)
            ready.set()
            self._loop.close()
            return
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving and remove the socket; idempotent."""
        if self._stopped or self._server is None or self._thread is None:
            return
        self._stopped = True
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        try:
            fut.result(timeout=(grace or 0) + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    provider: p.AgentStateProvider, socket_path: str, *, extra_servicers: Sequence[ServicerHook] = ()
) -> ServerHandle:
    """Start the API server in a background thread; returns once it listens. Call stop() to end it."""
    handle = ServerHandle(socket_path)
    ready = threading.Event()
    errors: list[BaseException] = []
    starter = start_server(provider, socket_path, extra_servicers=extra_servicers)
    handle._thread = threading.Thread(
        target=handle._run, args=(ready, errors, starter), name="pycilium-api", daemon=True
    )
    handle._thread.start()
    ready.wait()
    if errors:
        handle._thread.join(timeout=5)
        raise errors[0]
    return handle
