"""The agent's gRPC API server: socket handling, conversions, error mapping, both ways of running it."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
from pycilium.agent.api import codegen, server
from pycilium.agent.api import pycilium_pb2 as pb
from pycilium.agent.api import pycilium_pb2_grpc as pb_grpc
from pycilium.agent.api.provider import AgentStateProvider, IdentityInfo, IPAMInfo

from tests.cli.fake_agent import FakeAgent, running_agent


def _stub(path: Path) -> tuple[grpc.Channel, pb_grpc.AgentStub]:
    ch = grpc.insecure_channel(f"unix:{path}")
    return ch, pb_grpc.AgentStub(ch)


def test_fake_agent_satisfies_the_protocol() -> None:
    assert isinstance(FakeAgent(), AgentStateProvider)


def test_socket_modes_and_cleanup(tmp_path: Path) -> None:
    sock = tmp_path / "new" / "dir" / "pycilium.sock"
    with running_agent(sock):
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert not sock.exists()


def test_rpcs_convert_every_field(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with running_agent(sock) as state:
        ch, stub = _stub(sock)
        with ch:
            st = stub.Status(pb.StatusRequest(verbose=True), timeout=5)
            assert st.node_name == "node-1" and st.kubernetes.message == "1.30"
            assert st.kube_proxy_replacement.details["Backend Selection"] == "Random"
            assert dict(st.ipam.allocations) == state.ipam_info.allocations
            assert [c.name for c in st.controllers] == ["sync-services", "identity-gc"]
            assert st.cluster_health.message == "3/3 reachable"
            svcs = stub.ListServices(pb.ListServicesRequest(), timeout=5).services
            assert [(s.id, s.type, len(s.backends)) for s in svcs] == [(1, "ClusterIP", 2), (2, "NodePort", 1),
                                                                       (3, "ClusterIP", 0)]  # fmt: skip
            assert svcs[0].backends[1].state == "terminating" and svcs[0].name == "web"
            eps = stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5).endpoints
            assert eps[0].id == 339 and eps[0].ifname == "lxc1234" and list(eps[0].labels)[1] == "k8s:app=x"
            assert stub.GetEndpoint(pb.GetEndpointRequest(id=12), timeout=5).identity == 1
            ids = stub.ListIdentities(pb.ListIdentitiesRequest(), timeout=5).identities
            assert [i.id for i in ids] == [1, 2, 12345, 6443]
            assert stub.GetIPAM(pb.GetIPAMRequest(), timeout=5).cidr == "10.0.1.0/24"
            assert stub.DeleteEndpoint(pb.DeleteEndpointRequest(id=12), timeout=5).deleted is True
            assert stub.DeleteEndpoint(pb.DeleteEndpointRequest(id=12), timeout=5).deleted is False
            with pytest.raises(grpc.RpcError) as e:
                stub.GetEndpoint(pb.GetEndpointRequest(id=12), timeout=5)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND


class _Errors(FakeAgent):
    def get_identity(self, identity_id: int) -> IdentityInfo | None:
        if identity_id == 0:
            raise ValueError("identity 0 is not a real identity")
        raise LookupError(f"no identity {identity_id} here")

    def ipam(self) -> IPAMInfo:
        raise NotImplementedError


def test_provider_exceptions_map_to_status_codes(tmp_path: Path) -> None:
    sock = tmp_path / "e.sock"
    with running_agent(sock, _Errors()) as state:
        state.broken = True
        ch, stub = _stub(sock)
        with ch:
            cases = [
                (lambda: stub.GetIdentity(pb.GetIdentityRequest(id=0), timeout=5), grpc.StatusCode.INVALID_ARGUMENT,
                 "identity 0 is not a real identity"),
                (lambda: stub.GetIdentity(pb.GetIdentityRequest(id=9), timeout=5), grpc.StatusCode.NOT_FOUND,
                 "no identity 9 here"),
                (lambda: stub.GetIPAM(pb.GetIPAMRequest(), timeout=5), grpc.StatusCode.UNIMPLEMENTED,
                 "ipam is not implemented"),
                (lambda: stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=5), grpc.StatusCode.INTERNAL,
                 "RuntimeError: endpoint manager exploded"),
            ]  # fmt: skip
            for call, code, details in cases:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == code
                assert e.value.details() == details
            # the server survives errors
            assert stub.GetIdentity is not None
            assert len(stub.ListServices(pb.ListServicesRequest(), timeout=5).services) == 3


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    with running_agent(sock):
        with pytest.raises(server.ApiServerError, match="another server is already listening"):
            server.serve(FakeAgent(), str(sock))
        assert sock.exists()  # the refused second server did not take the socket away
        ch, stub = _stub(sock)
        with ch:
            assert len(stub.ListServices(pb.ListServicesRequest(), timeout=5).services) == 3
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(server.ApiServerError, match="is not a socket"):
        server.serve(FakeAgent(), str(regular))
    assert regular.read_text() == "x"


class _AsyncAgent(FakeAgent):
    """An agent whose state lives on its own event loop: async provider methods are awaited."""

    async def list_identities(self) -> list[IdentityInfo]:  # type: ignore[override]
        await asyncio.sleep(0)
        return [IdentityInfo(7, ["reserved:kube-apiserver"])]


def test_start_server_in_the_agents_loop(tmp_path: Path) -> None:
    sock = tmp_path / "aio.sock"

    async def scenario() -> list[int]:
        srv = await server.start_server(_AsyncAgent(), str(sock))
        try:
            async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
                stub = pb_grpc.AgentStub(ch)
                resp = await stub.ListIdentities(pb.ListIdentitiesRequest(), timeout=5)
                return [i.id for i in resp.identities]
        finally:
            await srv.stop(0)

    assert asyncio.run(scenario()) == [7]
    assert not sock.exists()


def test_checked_in_code_matches_the_proto(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    for path in written:
        checked_in = Path(codegen.API_DIR) / path.name
        assert path.read_text() == checked_in.read_text(), (
            f"{checked_in.name} is stale: run `python -m pycilium.agent.api.codegen`"
        )


def test_stop_is_idempotent(tmp_path: Path) -> None:
    handle = server.serve(FakeAgent(), str(tmp_path / "i.sock"))
    handle.stop(grace=0)
    handle.stop(grace=0)
    assert not os.path.exists(tmp_path / "i.sock")
