"""The lab kubelet's pod-spec handling: the runtime's view of the CNI configuration, the exact
environment and stdin a plugin gets, the pod server command, status patches. (The plugin itself runs
for real, against real agents, in tests/e2e.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from pycilium.lab.apiserver import APIServerThread
from pycilium.lab.cluster.kube import NAMESPACE, POD, Kube
from pycilium.lab.cluster.lab import Paths
from pycilium.lab.kubelet import (
    Kubelet,
    PodRuntime,
    cni_env,
    delete_netns,
    host_port_conflict,
    listening_ports,
    load_netconf,
    load_runtimes,
    netns_exists,
    plugin_config,
    pod_netns,
    result_ipv4,
    server_command,
)
from pycilium.lab.manifests import ContainerPort

A_POD = {"metadata": {"name": "web-1", "namespace": "shop", "uid": "0f3c2a9e-1111-2222-3333-444455556666"}}


def test_netconf_is_the_first_file_by_name(tmp_path: Path) -> None:
    assert load_netconf(str(tmp_path / "missing")) is None
    assert load_netconf(str(tmp_path)) is None
    (tmp_path / "README").write_text("not a config")
    (tmp_path / "00-broken.conflist").write_text("{")
    (tmp_path / "10-b.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "x"}]})
    )
    (tmp_path / "05-a.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "a", "type": "single"}))
    conf = load_netconf(str(tmp_path))
    assert conf == {
        "cniVersion": "0.4.0",
        "name": "a",
        "plugins": [{"cniVersion": "0.4.0", "name": "a", "type": "single"}],
    }
    (tmp_path / "05-a.conf").unlink()
    conf = load_netconf(str(tmp_path))
    assert conf is not None and conf["name"] == "b"


def test_plugin_environment_has_only_cni_variables() -> None:
    env = cni_env("ADD", "c" * 64, "/var/run/netns/x", A_POD, "/opt/lab/bin")
    assert env == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c" * 64,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
        f"K8S_POD_INFRA_CONTAINER_ID={'c' * 64};K8S_POD_UID=0f3c2a9e-1111-2222-3333-444455556666",
        "CNI_PATH": "/opt/lab/bin",
    }
    assert "PATH" not in env


def test_plugin_stdin_carries_name_version_and_prev_result() -> None:
    netconf = {"cniVersion": "1.1.0", "name": "pycilium", "plugins": [{"type": "pycilium-cni", "mtu": 1500}]}
    conf = plugin_config(netconf, netconf["plugins"][0], None)  # type: ignore[index]
    assert conf == {"type": "pycilium-cni", "mtu": 1500, "cniVersion": "1.1.0", "name": "pycilium"}
    prev = {"ips": [{"address": "10.0.0.2/32"}]}
    assert plugin_config(netconf, netconf["plugins"][0], prev)["prevResult"] == prev  # type: ignore[index]


def test_result_ipv4() -> None:
    assert result_ipv4({"ips": [{"address": "fd00::2/128"}, {"address": "10.200.1.7/32"}]}) == "10.200.1.7"
    assert result_ipv4({}) is None


def test_server_command_lists_every_tcp_and_udp_port_once() -> None:
    ports = [ContainerPort(8080, "TCP", "http"), ContainerPort(53, "UDP"), ContainerPort(8080, "TCP", "http"),
             ContainerPort(9000, "SCTP"), ContainerPort(8080, "UDP")]  # fmt: skip
    cmd = server_command("web-1", ports)
    assert cmd[1:] == ["-m", "pycilium.lab.podserver", "--name", "web-1", "--tcp", "8080", "--udp", "53",
                       "--udp", "8080"]  # fmt: skip


def test_listening_ports_from_proc_net() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0200C80A:1F90 0300C80A:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
    )
    assert listening_ports(tcp, "0A") == {8080}
    udp = "  sl  local_address rem_address   st\n   5: 00000000:0035 00000000:0000 07 0\n"
    assert listening_ports(udp, "07") == {53}


def test_pod_netns_names_are_ours_and_distinct() -> None:
    paths = Paths("pycilium-lab")
    a = pod_netns(paths.pod_netns_prefix, "0f3c2a9e-1111-2222-3333-444455556666")
    assert a == "pycilium-lab-pod-0f3c2a9e1111"
    assert paths.owns_netns(a)
    assert not Paths("pycilium-lab-e2e").owns_netns(a)
    assert not paths.owns_netns(pod_netns("pycilium-lab-e2e", "0f3c2a9e-1111"))
    for name in ("pycilium-lab-node1", "pycilium-lab-world", "pycilium-lab-underlay"):
        assert paths.owns_netns(name)
    assert not paths.owns_netns("pycilium-lab-nodeX") and not paths.owns_netns("pyctryagent")


def test_runtimes_round_trip(tmp_path: Path) -> None:
    rt = PodRuntime(uid="u", namespace="n", name="p", netns="x", container_id="c", ip="10.0.0.2", pid=4,
                    ports=[[80, "TCP", "http"]], result={"ips": []}, started="t")  # fmt: skip
    f = tmp_path / "kubelet.json"
    f.write_text(json.dumps({"node": "n1", "pods": {"u": rt.__dict__}}))
    assert load_runtimes(f) == {"u": rt}
    assert load_runtimes(tmp_path / "missing.json") == {}
    assert rt.marker == "pycilium.lab.podserver --name p "


@pytest.fixture(scope="module")
def kube() -> Iterator[Kube]:
    srv = APIServerThread()
    srv.start()
    cfg = client.Configuration()
    cfg.host = srv.url
    k = Kube(api=client.ApiClient(cfg))
    yield k
    k.close()
    srv.stop()


def test_running_status_goes_through_the_status_subresource(kube: Kube, tmp_path: Path) -> None:
    ns = f"k{uuid.uuid4().hex[:6]}"
    kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    pod = kube.create(POD, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": ns},
                            "spec": {"nodeName": "node1", "containers": [{"name": "c", "image": "i"}]}}, ns)  # fmt: skip
    k = Kubelet(kube, "node1", "192.168.200.11", str(tmp_path / "net.d"), str(tmp_path / "bin"), str(tmp_path),
                "t")  # fmt: skip
    k._patch_waiting(pod, "NetworkNotReady", "no CNI configuration yet")
    got = kube.get(POD, "p", ns)
    assert got is not None and got["status"]["phase"] == "Pending"
    assert next(c for c in got["status"]["conditions"] if c["type"] == "Ready")["reason"] == "NetworkNotReady"
    rt = PodRuntime(uid=pod["metadata"]["uid"], namespace=ns, name="p", netns="x", container_id="c" * 64,
                    ip="10.200.1.9", started="2026-01-01T00:00:00Z")  # fmt: skip
    k._patch_running(got, rt)
    got = kube.get(POD, "p", ns)
    assert got is not None
    st = got["status"]
    assert (st["phase"], st["podIP"], st["podIPs"], st["hostIP"]) == (
        "Running",
        "10.200.1.9",
        [{"ip": "10.200.1.9"}],
        "192.168.200.11",
    )
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"
    assert st["containerStatuses"][0]["ready"] is True and st["containerStatuses"][0]["name"] == "c"
    assert got["spec"]["containers"][0]["image"] == "i"  # spec untouched


def test_host_port_conflicts_by_port_and_protocol() -> None:
    a = PodRuntime(uid="a", namespace="n", name="hn-a", netns="", container_id="c", ports=[[9090, "TCP", ""]],
                   host_network=True)  # fmt: skip
    tcp = [ContainerPort(9090, "TCP")]
    assert host_port_conflict(tcp, [a], set(), set()) == "TCP/9090 is used by pod n/hn-a"
    assert host_port_conflict([ContainerPort(9090, "UDP")], [a], set(), set()) is None
    assert host_port_conflict([ContainerPort(9091, "TCP")], [a], set(), set()) is None
    assert host_port_conflict(tcp, [], {9090}, set()) == "TCP/9090 is in use on the node"
    assert host_port_conflict(tcp, [], set(), {9090}) is None
    assert host_port_conflict([ContainerPort(53, "UDP")], [], {53}, {53}) == "UDP/53 is in use on the node"
    assert host_port_conflict([], [a], {1}, {1}) is None


def test_host_network_runtime_has_no_netns(tmp_path: Path) -> None:
    old = {"uid": "u", "namespace": "n", "name": "p", "netns": "x", "container_id": "c"}  # before hostNetwork
    f = tmp_path / "kubelet.json"
    f.write_text(json.dumps({"node": "n1", "pods": {"u": old}}))
    assert load_runtimes(f)["u"].host_network is False
    assert not netns_exists("")
    delete_netns("")  # nothing to do, and no `ip netns` call with an empty name


def test_host_network_pod_with_a_taken_port_is_rejected(kube: Kube, tmp_path: Path) -> None:
    ns = f"k{uuid.uuid4().hex[:6]}"
    kube.create(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    spec = {
        "nodeName": "node1",
        "hostNetwork": True,
        "containers": [{"name": "c", "ports": [{"containerPort": 9090}]}],
    }
    pod = kube.create(POD, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hn-b", "namespace": ns},
                            "spec": spec}, ns)  # fmt: skip
    k = Kubelet(kube, "node1", "192.168.200.11", str(tmp_path / "net.d"), str(tmp_path / "bin"), str(tmp_path),
                "t")  # fmt: skip
    k.runtimes["a"] = PodRuntime(uid="a", namespace=ns, name="hn-a", netns="", container_id="c",
                                 ip="192.168.200.11", ports=[[9090, "TCP", ""]], host_network=True)  # fmt: skip
    k.setup_host_network(pod)  # refused before anything is started
    got = kube.get(POD, "hn-b", ns)
    assert got is not None
    st = got["status"]
    assert (st["phase"], st["reason"]) == ("Failed", "NodePorts")
    assert f"TCP/9090 is used by pod {ns}/hn-a" in st["message"]
    assert "podIP" not in st
    assert set(k.runtimes) == {"a"}
