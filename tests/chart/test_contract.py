"""The chart's contracts with the agent: RBAC, the ConfigMap keys and values, mounts, probes, CNI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pycilium.agent.config import AgentConfig, load_config

from .helm import CHART_DIR, NAMESPACE, Helm
from .manifests import (
    Obj,
    agent_container,
    config_data,
    covering_mount,
    daemonset,
    find,
    find_all,
    host_path_of,
    init_containers,
    merge_values,
    pod_spec,
    volumes,
)

# What the agent does with the Kubernetes API: (apiGroup, resource) -> verbs. The ClusterRole must
# grant exactly this: anything missing breaks the agent, anything more is privilege it does not need.
AGENT_API_USE: dict[tuple[str, str], set[str]] = {
    ("", "nodes"): {"get", "list", "watch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "services"): {"get", "list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch", "create", "update"},
    ("pycilium.io", "pyciliumidentities"): {"get", "list", "watch", "create", "update", "delete"},
    ("pycilium.io", "pyciliumnetworkpolicies"): {"get", "list", "watch"},
}
OWN_CRDS = {"pyciliumidentities.pycilium.io", "pyciliumnetworkpolicies.pycilium.io"}

AGENT_CAPABILITIES = {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE", "IPC_LOCK"}
ALIASES = {f.alias or name for name, f in AgentConfig.model_fields.items()}
KPR_VALUES: dict[str, Any] = {
    "kubeProxyReplacement": True,
    "k8sServiceHost": "10.0.0.1",
    "k8sServicePort": 6443,
}


@pytest.fixture(scope="session")
def kpr_objects(helm: Helm) -> list[Obj]:
    return helm.template(KPR_VALUES)


@pytest.fixture(params=["default", "custom", "kpr"])
def rendered(
    request: pytest.FixtureRequest,
    default_objects: list[Obj],
    custom_objects: list[Obj],
    kpr_objects: list[Obj],
    default_values: dict[str, Any],
    custom_values: dict[str, Any],
) -> tuple[list[Obj], dict[str, Any]]:
    """(objects, effective values) for each rendering the contracts are checked on."""
    if request.param == "default":
        return default_objects, default_values
    if request.param == "custom":
        return custom_objects, merge_values(default_values, custom_values)
    return kpr_objects, merge_values(default_values, KPR_VALUES)


def _load(data: dict[str, str], tmp_path: Path) -> AgentConfig:
    cfg = tmp_path / "config"
    cfg.mkdir()
    for key, value in data.items():
        assert isinstance(value, str), f"{key}: ConfigMap values are strings"
        (cfg / key).write_text(value)
    return load_config(cfg, environ={})


# ---------------------------------------------------------------------------------------------------
# RBAC


def _granted(role: Obj) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard {field} in {rule}"
        if "resourceNames" in rule:
            assert set(rule["resourceNames"]) <= OWN_CRDS, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rbac_grants_exactly_what_the_agent_uses(default_objects: list[Obj]) -> None:
    role = find(default_objects, "ClusterRole", "pycilium")
    assert _granted(role) == AGENT_API_USE


def test_rbac_crd_update_is_limited_to_own_crds(default_objects: list[Obj]) -> None:
    role = find(default_objects, "ClusterRole", "pycilium")
    for rule in role["rules"]:
        if "customresourcedefinitions" in rule["resources"] and "update" in rule["verbs"]:
            assert set(rule["resourceNames"]) == OWN_CRDS


@pytest.mark.parametrize("which", ["default", "custom"])
def test_rbac_binds_the_agents_service_account(
    which: str, default_objects: list[Obj], custom_objects: list[Obj]
) -> None:
    objects = default_objects if which == "default" else custom_objects
    binding = find(objects, "ClusterRoleBinding", "pycilium")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "pycilium",
    }
    sa = find(objects, "ServiceAccount")
    (subject,) = binding["subjects"]
    assert subject == {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    assert pod_spec(objects)["serviceAccountName"] == sa["metadata"]["name"]


def test_crds_match_rbac(default_objects: list[Obj]) -> None:
    """The resources RBAC names are the CRDs the chart ships (group, plural, scope)."""
    expected = {
        "pyciliumidentities": ("PyCiliumIdentity", "Cluster"),
        "pyciliumnetworkpolicies": ("PyCiliumNetworkPolicy", "Namespaced"),
    }
    for crd in find_all(default_objects, "CustomResourceDefinition"):
        spec = crd["spec"]
        assert spec["group"] == "pycilium.io"
        assert ("pycilium.io", spec["names"]["plural"]) in AGENT_API_USE
        assert (spec["names"]["kind"], spec["scope"]) == expected[spec["names"]["plural"]]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"


def test_crds_match_the_agents_own(default_objects: list[Obj]) -> None:
    """The agent installs/updates the same definitions at start (Helm installs crds/ only once)."""
    crds = pytest.importorskip("pycilium.agent.k8s.crds")
    chart = {c["metadata"]["name"]: c for c in find_all(default_objects, "CustomResourceDefinition")}
    agent = {c["metadata"]["name"]: c for c in crds.AGENT_CRDS}
    assert chart == agent


# ---------------------------------------------------------------------------------------------------
# ConfigMap <-> agent/config.py


def test_configmap_keys_are_agent_settings(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, _ = rendered
    data = config_data(objects)
    unknown = set(data) - ALIASES
    assert not unknown, f"ConfigMap keys the agent rejects: {sorted(unknown)}"


def test_agent_loads_rendered_configmap(rendered: tuple[list[Obj], dict[str, Any]], tmp_path: Path) -> None:
    objects, values = rendered
    cfg = _load(config_data(objects), tmp_path)
    assert cfg.kube_proxy_replacement is values["kubeProxyReplacement"]
    assert cfg.routing_mode == values["routingMode"]
    assert cfg.tunnel_protocol == values["tunnelProtocol"]
    assert cfg.tunnel_port == values["tunnelPort"]
    assert cfg.ipam_mode == values["ipam"]["mode"]
    assert cfg.mtu == values["MTU"]
    assert cfg.lb_algorithm == values["loadBalancer"]["algorithm"]
    assert cfg.maglev_table_size == values["maglev"]["tableSize"]
    lo, hi = (int(x) for x in values["nodePort"]["range"].split(","))
    assert (cfg.node_port_min, cfg.node_port_max) == (lo, hi)
    assert cfg.enable_ipv4_masquerade is values["bpf"]["masquerade"]
    assert cfg.ct_global_tcp_max == values["bpf"]["ctTcpMax"]
    assert cfg.ct_global_any_max == values["bpf"]["ctAnyMax"]
    assert cfg.nat_global_max == values["bpf"]["natMax"]
    assert cfg.lb_map_max == values["bpf"]["lbMapMax"]
    assert cfg.policy_map_max == values["bpf"]["policyMapMax"]
    assert cfg.policy_enforcement_mode == values["policyEnforcementMode"]
    assert cfg.service_no_backend_response == values["serviceNoBackendResponse"]
    assert cfg.cluster_pool_ipv4_cidr == values["ipam"]["clusterPoolIPv4PodCIDR"]
    assert cfg.service_cidr == values["serviceCIDR"]
    assert cfg.devices == values["devices"]
    assert cfg.cni_exclusive is values["cni"]["exclusive"]
    assert cfg.cni_conf_name == values["cni"]["confFileName"]
    assert cfg.cni_log_file == values["cni"]["logFile"]
    assert cfg.write_cni_conf_when_ready is values["cni"]["install"]
    assert cfg.health_port == values["healthPort"]
    assert cfg.prometheus_port == (values["prometheus"]["port"] if values["prometheus"]["enabled"] else 0)
    assert cfg.log_level == ("debug" if values["debug"]["enabled"] else "info")
    assert cfg.log_format == values["logOptions"]["format"]
    if values["k8sServiceHost"]:
        assert cfg.k8s_service_host == values["k8sServiceHost"]
        assert cfg.k8s_service_port == values["k8sServicePort"]
    else:
        assert cfg.k8s_service_host is None and cfg.k8s_service_port is None


def test_extra_config_reaches_the_agent(custom_objects: list[Obj], tmp_path: Path) -> None:
    cfg = _load(config_data(custom_objects), tmp_path)
    assert cfg.ct_timeout_tcp == 3600
    assert cfg.snat_port_min == 40000
    assert cfg.monitor_trace is True
    assert cfg.conntrack_gc_max_interval == 1800.5


def test_large_integers_render_without_exponent(helm: Helm, tmp_path: Path) -> None:
    objects = helm.template({"bpf": {"ctTcpMax": 16777216, "natMax": 10000000}})
    data = config_data(objects)
    assert data["bpf-ct-global-tcp-max"] == "16777216"
    assert data["bpf-nat-global-max"] == "10000000"
    assert _load(data, tmp_path).nat_global_max == 10_000_000


def test_extra_config_allowlist_names_agent_settings() -> None:
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "pycilium.extraConfigKeys" -}}\n(.*?)\n{{- end', helpers, re.S)
    assert block is not None
    allowed = set(block.group(1).split())
    assert allowed, "allowlist is empty"
    assert allowed <= ALIASES, f"not AgentConfig keys: {sorted(allowed - ALIASES)}"
    per_node = {"node-name", "node-ip", "pod-cidr", "kubeconfig"}
    assert not allowed & per_node


def test_agent_env_overrides_are_agent_fields(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, _ = rendered
    env = {e["name"]: e for e in agent_container(objects)["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["PYCILIUM_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    for name in env:
        if name.startswith("PYCILIUM_"):
            assert name[len("PYCILIUM_") :].lower() in AgentConfig.model_fields, name


def test_api_server_env_only_when_set(default_objects: list[Obj], kpr_objects: list[Obj]) -> None:
    names = {e["name"] for e in agent_container(default_objects)["env"]}
    assert "KUBERNETES_SERVICE_HOST" not in names and "KUBERNETES_SERVICE_PORT" not in names
    env = {e["name"]: e.get("value") for e in agent_container(kpr_objects)["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"


def test_config_checksum_rolls_the_pods(helm: Helm, default_objects: list[Obj]) -> None:
    def checksum(objects: list[Obj]) -> str:
        annotations = daemonset(objects)["spec"]["template"]["metadata"]["annotations"]
        value: str = annotations["checksum/config"]
        return value

    assert checksum(default_objects) == checksum(helm.template())
    assert checksum(default_objects) != checksum(helm.template({"bpf": {"ctTcpMax": 1048576}}))
    assert checksum(default_objects) != checksum(helm.template({"cleanState": True}))


def test_clean_state_flags_live_in_init_config(default_objects: list[Obj], custom_objects: list[Obj]) -> None:
    assert find(default_objects, "ConfigMap", "pycilium-init-config")["data"] == {
        "clean-pycilium-state": "false",
        "clean-pycilium-bpf-state": "false",
    }
    assert find(custom_objects, "ConfigMap", "pycilium-init-config")["data"] == {
        "clean-pycilium-state": "true",
        "clean-pycilium-bpf-state": "true",
    }
    clean = init_containers(default_objects)["clean-state"]
    refs = {
        e["valueFrom"]["configMapKeyRef"]["key"]: e["valueFrom"]["configMapKeyRef"]["name"]
        for e in clean["env"]
        if "valueFrom" in e
    }
    assert refs == {
        "clean-pycilium-state": "pycilium-init-config",
        "clean-pycilium-bpf-state": "pycilium-init-config",
    }


# ---------------------------------------------------------------------------------------------------
# Mounts, probes, CNI install, security


def test_agent_command_and_config_mount(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, values = rendered
    agent = agent_container(objects)
    assert agent["command"] == ["pycilium-agent"]
    assert agent["args"][0] == "--config-dir=/etc/pycilium/config"
    assert agent["args"][1:] == values["extraArgs"]
    mount = covering_mount(agent, "/etc/pycilium/config")
    assert mount is not None and mount["mountPath"] == "/etc/pycilium/config" and mount["readOnly"]
    assert volumes(objects)[mount["name"]]["configMap"]["name"] == "pycilium-config"


def test_agent_mounts_match_config_paths(rendered: tuple[list[Obj], dict[str, Any]], tmp_path: Path) -> None:
    objects, values = rendered
    cfg = _load(config_data(objects), tmp_path)
    agent = agent_container(objects)

    # Pinned maps: bpf-root's parent is the host's bpffs, seen with HostToContainer propagation.
    bpf_root = Path(cfg.bpf_root)
    mount = covering_mount(agent, str(bpf_root))
    assert mount is not None and mount["mountPath"] == str(bpf_root.parent) == values["bpf"]["root"]
    assert mount.get("mountPropagation") == "HostToContainer"
    assert host_path_of(objects, agent, str(bpf_root)) == str(bpf_root)

    # State dir and sockets: the same path on the host, where the CNI plugin and `pycilium` find them.
    for path in (cfg.state_dir, cfg.socket_path, cfg.cni_socket_path):
        assert host_path_of(objects, agent, path) == path, path

    # CNI configuration: the agent writes into the host's cni.confPath.
    assert host_path_of(objects, agent, cfg.cni_conf_dir) == values["cni"]["confPath"]
    assert not covering_mount(agent, cfg.cni_conf_dir).get("readOnly")  # type: ignore[union-attr]

    # The agent never writes CNI binaries: no mount of the bin dir.
    for m in agent["volumeMounts"]:
        vol = volumes(objects)[m["name"]]
        assert vol.get("hostPath", {}).get("path") != values["cni"]["binPath"]

    # Node sysctls (ip_forward, rp_filter of the veths): written under proc-sys-root, a writable mount
    # of the host's /proc/sys/net (the container's own /proc/sys is read-only).
    net_sysctls = f"{cfg.proc_sys_root}/net"
    assert host_path_of(objects, agent, net_sysctls) == "/proc/sys/net"
    assert not covering_mount(agent, net_sysctls).get("readOnly")  # type: ignore[union-attr]

    # cgroup2 root for socket load-balancing: mounted where the agent's cgroup-root points.
    assert cfg.cgroup_root == values["cgroup"]["hostRoot"]
    cg = covering_mount(agent, values["cgroup"]["hostRoot"])
    assert cg is not None and cg["mountPath"] == values["cgroup"]["hostRoot"]
    assert cg.get("mountPropagation") == "HostToContainer"

    netns = covering_mount(agent, "/var/run/netns")
    assert netns is not None and netns.get("mountPropagation") == "HostToContainer"

    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    if values["kernelHeaders"]["hostMount"]:
        assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    else:
        assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    assert "/run/xtables.lock" not in mounts


def test_probes_hit_health_port(rendered: tuple[list[Obj], dict[str, Any]], tmp_path: Path) -> None:
    objects, values = rendered
    cfg = _load(config_data(objects), tmp_path)
    agent = agent_container(objects)
    assert pod_spec(objects)["hostNetwork"] is True
    assert cfg.health_bind == "127.0.0.1"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = agent[probe]["httpGet"]
        assert get == {
            "host": "127.0.0.1",
            "path": "/healthz",
            "port": values["healthPort"],
            "scheme": "HTTP",
        }
        assert get["port"] == cfg.health_port


def test_cni_install_targets_bin_path(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, values = rendered
    inits = init_containers(objects)
    install = inits["install-cni-binaries"]
    (mount,) = install["volumeMounts"]
    assert volumes(objects)[mount["name"]]["hostPath"]["path"] == values["cni"]["binPath"]
    assert install["command"] == ["pycilium-install-cni", mount["mountPath"]]
    assert not install["securityContext"].get("privileged")
    assert install["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Order: mounts first, then state cleaning, then the plugin.
    assert list(inits) == ["mount-bpf-fs", "mount-cgroup", "clean-state", "install-cni-binaries"]


def test_prestop_removes_conflist_only_on_uninstall(
    default_objects: list[Obj], custom_objects: list[Obj], custom_values: dict[str, Any], tmp_path: Path
) -> None:
    assert "lifecycle" not in agent_container(default_objects)
    agent = agent_container(custom_objects)
    command = agent["lifecycle"]["preStop"]["exec"]["command"]
    cfg = _load(config_data(custom_objects), tmp_path)
    target = f"{cfg.cni_conf_dir}/{cfg.cni_conf_name}"
    assert command == ["rm", "-f", target]
    assert host_path_of(custom_objects, agent, target) == (
        f"{custom_values['cni']['confPath']}/{custom_values['cni']['confFileName']}"
    )


def test_agent_is_not_privileged(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, _ = rendered
    sc = agent_container(objects)["securityContext"]
    assert sc.get("privileged") is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPABILITIES
    spec = pod_spec(objects)
    assert not spec.get("hostPID") and not spec.get("hostIPC")
    assert spec["priorityClassName"] == "system-node-critical"


def test_only_mount_init_containers_are_privileged(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, _ = rendered
    privileged = {
        n for n, c in init_containers(objects).items() if c.get("securityContext", {}).get("privileged")
    }
    assert privileged == {"mount-bpf-fs", "mount-cgroup"}
    for name, c in init_containers(objects).items():
        for m in c.get("volumeMounts", []):
            if m.get("mountPropagation") == "Bidirectional":
                assert name in privileged, f"{name}: Bidirectional propagation needs a privileged container"


def test_mount_init_containers_target_configured_paths(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, values = rendered
    inits = init_containers(objects)
    bpf = inits["mount-bpf-fs"]
    assert {e["name"]: e["value"] for e in bpf["env"]} == {"BPF_ROOT": values["bpf"]["root"]}
    assert host_path_of(objects, bpf, values["bpf"]["root"]) == values["bpf"]["root"]
    cg = inits["mount-cgroup"]
    assert {e["name"]: e["value"] for e in cg["env"]} == {"CGROUP_ROOT": values["cgroup"]["hostRoot"]}
    assert host_path_of(objects, cg, values["cgroup"]["hostRoot"]) == values["cgroup"]["hostRoot"]
    assert host_path_of(objects, cg, "/hostproc") == "/proc"


def test_daemonset_rollout_and_scheduling(rendered: tuple[list[Obj], dict[str, Any]]) -> None:
    objects, values = rendered
    ds = daemonset(objects)
    assert ds["spec"]["updateStrategy"] == values["updateStrategy"]
    spec = pod_spec(objects)
    assert spec["tolerations"] == values["tolerations"]
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )


def test_image_reference(default_objects: list[Obj], custom_objects: list[Obj]) -> None:
    chart_app_version = "0.1.0"
    assert agent_container(default_objects)["image"] == f"pycilium:{chart_app_version}"
    assert agent_container(custom_objects)["image"] == (
        "registry.example.com/net/pycilium:0.1.0-rc1@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    images = {c["image"] for c in pod_spec(custom_objects)["initContainers"]}
    assert images == {agent_container(custom_objects)["image"]}
