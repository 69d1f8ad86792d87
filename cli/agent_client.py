"""A small client of the agent's gRPC API for the CLI (imports grpc; load it lazily)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from pycilium.agent.api import pycilium_pb2 as pb
from pycilium.agent.api import pycilium_pb2_grpc as pb_grpc
from pycilium.cli.agent_socket import socket_from_host, socket_problem, unreachable_message
from pycilium.cli.errors import CliError, Unavailable

DEFAULT_TIMEOUT = 5.0
T = TypeVar("T")

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class AgentUnreachable(Unavailable):
    def __init__(self, socket_path: str, detail: str = ""):
        super().__init__(unreachable_message(socket_path, detail))
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
        problem = socket_problem(self.socket_path)
        if problem is not None:
            raise Unavailable(problem)
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
