"""A small client of the agent's gRPC API for the CLI (imports grpc; load it lazily)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from pycilium.agent.api import pycilium_pb2 as pb
from pycilium.agent.api import pycilium_pb2_grpc as pb_grpc
from pycilium.cli.errors import CliError, Unavailable

DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def socket_from_host(host: str) -> str:
    """-H accepts a path or a unix:// URL (Cilium style)."""
    if host.startswith("unix://"):
        return host[len("unix://") :]
    if host.startswith("unix:"):
        return host[len("unix:") :]
    return host


class AgentUnreachable(Unavailable):
    def __init__(self, socket_path: str, detail: str = ""):
        hint = "is it running?"
        if "ermission denied" in detail:
            hint = "permission denied (the socket is root-only)"
        super().__init__(f"cannot reach the agent at {socket_path}: {hint}")
        self.detail = detail


class AgentClient:
    """One channel to the agent; every call has a deadline and maps transport errors to AgentUnreachable."""

    def __init__(self, host: str, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = socket_from_host(host)
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix:" + os.path.abspath(self.socket_path))
        self._stub = pb_grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any) -> T:
        if not os.path.exists(self.socket_path):
            raise AgentUnreachable(self.socket_path, "no such socket")
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code in _UNREACHABLE:
                raise AgentUnreachable(self.socket_path, details or "") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise CliError(details or "not found") from None
            name = code.name if code is not None else "ERROR"
            raise CliError(f"agent API error ({name}): {details}") from None

    def status(self, verbose: bool = False) -> pb.StatusResponse:
        return self._call(self._stub.Status, pb.StatusRequest(verbose=verbose))

    def list_services(self) -> list[pb.Service]:
        return list(self._call(self._stub.ListServices, pb.ListServicesRequest()).services)

    def list_endpoints(self) -> list[pb.Endpoint]:
        return list(self._call(self._stub.ListEndpoints, pb.ListEndpointsRequest()).endpoints)

    def get_endpoint(self, endpoint_id: int) -> pb.Endpoint:
        return self._call(self._stub.GetEndpoint, pb.GetEndpointRequest(id=endpoint_id))

    def delete_endpoint(self, endpoint_id: int) -> bool:
        return bool(self._call(self._stub.DeleteEndpoint, pb.DeleteEndpointRequest(id=endpoint_id)).deleted)

    def list_identities(self) -> list[pb.Identity]:
        return list(self._call(self._stub.ListIdentities, pb.ListIdentitiesRequest()).identities)

    def get_identity(self, identity_id: int) -> pb.Identity:
        return self._call(self._stub.GetIdentity, pb.GetIdentityRequest(id=identity_id))

    def ipam(self) -> pb.IPAMStatus:
        return self._call(self._stub.GetIPAM, pb.GetIPAMRequest())


def to_dict(message: Any) -> dict[str, Any]:
    """A message as the JSON object `-o json` prints (proto field names, defaults included)."""
    from google.protobuf.json_format import MessageToDict

    return dict(
        MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )
