"""helm template: renders validate against Kubernetes' schemas; bad values and combinations fail."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from .helm import KUBE_VERSION, NAMESPACE, RELEASE, Helm
from .manifests import Obj, agent_container, config_data, daemonset, find, find_all, init_containers

# Kinds without a schema in kubernetes-validate (custom resources), checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor"}

SCENARIOS: dict[str, dict[str, Any]] = {
    "mtu": {"MTU": 1450},
    "maglev": {"loadBalancer": {"algorithm": "maglev"}, "maglev": {"tableSize": 131071}},
    "custom-paths": {
        "bpf": {"root": "/run/bpf"},
        "cni": {"binPath": "/home/kubernetes/bin", "confPath": "/etc/kubernetes/cni/net.d"},
        "cgroup": {"hostRoot": "/run/pycilium-cgroup"},
    },
    "kube-proxy-replacement": {
        "kubeProxyReplacement": True,
        "k8sServiceHost": "10.0.0.1",
        "k8sServicePort": 6443,
    },
    "minimal": {
        "prometheus": {"enabled": False},
        "cni": {"install": False},
        "bpf": {"autoMount": {"enabled": False}},
        "cgroup": {"autoMount": {"enabled": False}},
        "kernelHeaders": {"hostMount": False},
        "securityContext": {"capabilities": {"cleanState": []}},
        "serviceAccount": {"create": False},
        "rbac": {"create": False},
    },
}


def _validate_all(objects: list[Obj]) -> set[str]:
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {e.message}")
    return kinds


def test_default_render_validates(default_objects: list[Obj]) -> None:
    kinds = _validate_all(default_objects)
    assert kinds == {
        "CustomResourceDefinition",
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "DaemonSet",
        "Pod",
    }


def test_custom_render_validates(custom_objects: list[Obj]) -> None:
    kinds = _validate_all(custom_objects)
    assert "ServiceMonitor" in kinds
    sm = find(custom_objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = find(custom_objects, "Service", "pycilium-agent-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["interval"] == "30s"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_render_and_validate(helm: Helm, name: str) -> None:
    objects = helm.template(SCENARIOS[name])
    _validate_all(objects)
    assert daemonset(objects)


def test_minimal_scenario_drops_optional_parts(helm: Helm) -> None:
    objects = helm.template(SCENARIOS["minimal"])
    assert not find_all(objects, "Service")
    assert not find_all(objects, "ServiceAccount")
    assert not find_all(objects, "ClusterRole")
    assert set(init_containers(objects)) == {"clean-state"}
    agent = agent_container(objects)
    assert "ports" not in agent
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert "/lib/modules" not in mounts and "/usr/src" not in mounts
    data = config_data(objects)
    assert data["prometheus-serve-port"] == "0"
    assert data["write-cni-conf-when-ready"] == "false"


def test_metrics_service_is_headless(default_objects: list[Obj]) -> None:
    svc = find(default_objects, "Service", "pycilium-agent-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 9962
    ds = daemonset(default_objects)
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert port["targetPort"] in {p["name"] for p in agent_container(default_objects)["ports"]}


def test_helm_test_hook_pod(default_objects: list[Obj]) -> None:
    pod = find(default_objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    assert spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    assert c["command"] == ["pycilium", "status", "--brief"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not c["securityContext"].get("privileged")
    (mount,) = c["volumeMounts"]
    (vol,) = spec["volumes"]
    assert mount["mountPath"] == vol["hostPath"]["path"] == "/var/run/pycilium"


@pytest.mark.parametrize("kpr", [False, True])
def test_notes_tell_how_to_check_health(helm: Helm, kpr: bool) -> None:
    args = ["install", RELEASE, str(helm.chart), "--namespace", NAMESPACE, "--dry-run=client"]
    if kpr:
        args += ["--set", "kubeProxyReplacement=true,k8sServiceHost=10.0.0.1,k8sServicePort=6443"]
    notes = helm.run(*args).split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} exec ds/pycilium -- pycilium status" in notes
    assert f"helm test {RELEASE} -n {NAMESPACE}" in notes
    assert ("kube-proxy replacement is on" in notes) is kpr


# ---------------------------------------------------------------------------------------------------
# CRDs


def _assert_structural(schema: dict[str, Any], where: str) -> None:
    """Kubernetes structural-schema rules that matter here: every node has a type; properties and
    additionalProperties are not combined; metadata is only `type: object`."""
    if not (schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")):
        assert "type" in schema, f"{where}: no type"
    assert not ("properties" in schema and "additionalProperties" in schema), (
        f"{where}: both kinds of properties"
    )
    for key, sub in schema.get("properties", {}).items():
        if where == "" and key == "metadata":
            assert sub == {"type": "object"}, "metadata must be just type: object"
            continue
        _assert_structural(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        _assert_structural(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        _assert_structural(schema["additionalProperties"], f"{where}{{}}")


def _crd_schema(objects: list[Obj], name: str) -> dict[str, Any]:
    crd = find(objects, "CustomResourceDefinition", name)
    (version,) = crd["spec"]["versions"]
    assert version["served"] and version["storage"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_crds_are_structural(default_objects: list[Obj]) -> None:
    crds = find_all(default_objects, "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == {
        "pyciliumidentities.pycilium.io",
        "pyciliumnetworkpolicies.pycilium.io",
    }
    for crd in crds:
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        for version in crd["spec"]["versions"]:
            _assert_structural(version["schema"]["openAPIV3Schema"], "")


def test_crds_are_not_rendered_as_templates(helm: Helm) -> None:
    """CRDs live in crds/: installed once by helm, never deleted with the release (identities stay)."""
    objects = helm.template(include_crds=False)
    assert not find_all(objects, "CustomResourceDefinition")


def test_crd_schemas_accept_and_reject_instances(default_objects: list[Obj]) -> None:
    identity = jsonschema.Draft7Validator(_crd_schema(default_objects, "pyciliumidentities.pycilium.io"))
    identity.validate(
        {
            "apiVersion": "pycilium.io/v1",
            "kind": "PyCiliumIdentity",
            "metadata": {"name": "12345"},
            "security-labels": {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default"},
        }
    )
    assert not identity.is_valid({"metadata": {"name": "1"}, "security-labels": {"k8s:app": 1}})
    assert not identity.is_valid({"metadata": {"name": "1"}})

    policy = jsonschema.Draft7Validator(_crd_schema(default_objects, "pyciliumnetworkpolicies.pycilium.io"))
    policy.validate(
        {
            "apiVersion": "pycilium.io/v1",
            "kind": "PyCiliumNetworkPolicy",
            "metadata": {"name": "allow-web", "namespace": "default"},
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [
                    {
                        "fromEndpoints": [
                            {"matchExpressions": [{"key": "role", "operator": "In", "values": ["fe"]}]}
                        ],
                        "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                    },
                    {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
                ],
                "egress": [
                    {"toCIDR": ["0.0.0.0/0"], "toPorts": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]}
                ],
            },
        }
    )
    bad_protocol = {
        "spec": {
            "endpointSelector": {},
            "ingress": [{"toPorts": [{"ports": [{"port": "1", "protocol": "SCTP"}]}]}],
        }
    }
    assert not policy.is_valid(bad_protocol)
    assert not policy.is_valid({"spec": {"endpointSelector": {}, "egress": [{"toCIDR": ["not-a-cidr"]}]}})
    assert not policy.is_valid({"spec": {}})


# ---------------------------------------------------------------------------------------------------
# values.schema.json rejects bad values


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"healthPort": "9879x"}, "at '/healthPort'"),  # wrong type
        ({"kubeProxyReplacement": "yes"}, "at '/kubeProxyReplacement'"),
        ({"routingMode": "geneve"}, "at '/routingMode'"),  # bad enum
        ({"tunnelProtocol": "geneve"}, "at '/tunnelProtocol'"),
        ({"tunnelPort": 0}, "at '/tunnelPort'"),
        ({"ipam": {"mode": "cluster-pool"}}, "at '/ipam/mode'"),
        ({"loadBalancer": {"algorithm": "roundrobin"}}, "at '/loadBalancer/algorithm'"),
        ({"maglev": {"tableSize": 1000}}, "at '/maglev/tableSize'"),
        ({"prometheus": {"port": 70000}}, "at '/prometheus/port'"),  # out of range
        ({"healthPort": 0}, "at '/healthPort'"),
        ({"k8sServicePort": 65536}, "at '/k8sServicePort'"),
        ({"MTU": 576}, "at '/MTU'"),
        ({"bpf": {"ctTcpMax": 10}}, "at '/bpf/ctTcpMax'"),
        ({"nodePort": {"range": "30000-32767"}}, "at '/nodePort/range'"),
        ({"cni": {"binPath": "opt/cni/bin"}}, "at '/cni/binPath'"),
        ({"cni": {"confFileName": "05-pycilium.conf"}}, "at '/cni/confFileName'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"image": {"digest": "sha256:abc"}}, "at '/image/digest'"),
        ({"updateStrategy": {"type": "Recreate"}}, "at '/updateStrategy/type'"),
        (
            {"securityContext": {"capabilities": {"agent": ["ALL"]}}},
            "at '/securityContext/capabilities/agent/0'",
        ),
        ({"extraConfig": {"Bad_Key": "1"}}, "invalid propertyName 'Bad_Key'"),
        ({"bpfRoot": "/sys/fs/bpf"}, "additional properties 'bpfRoot' not allowed"),  # a typo
        ({"cni": {"binpath": "/opt/cni/bin"}}, "at '/cni'"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], needle: str) -> None:
    err = helm.template_error(values)
    assert "values don't meet the specifications of the schema" in err, err
    assert needle in err, err


def test_schema_rejects_bad_set_flag(helm: Helm) -> None:
    err = helm.template_error(extra=["--set", "healthPort=abc"])
    assert "/healthPort" in err and "want integer" in err


def test_set_flags_accepted(helm: Helm) -> None:
    objects = helm.template(
        extra=[
            "--set",
            "kubeProxyReplacement=true",
            "--set",
            "k8sServiceHost=api.internal",
            "--set",
            "k8sServicePort=443",
        ]
    )
    data = config_data(objects)
    assert data["k8s-service-host"] == "api.internal"
    assert data["k8s-service-port"] == "443"


# ---------------------------------------------------------------------------------------------------
# {{ fail }}: combinations the schema cannot express


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"kubeProxyReplacement": True}, "kubeProxyReplacement=true needs k8sServiceHost and k8sServicePort"),
        (
            {"kubeProxyReplacement": True, "k8sServiceHost": "10.0.0.1"},
            "kubeProxyReplacement=true needs k8sServiceHost and k8sServicePort",
        ),
        ({"k8sServiceHost": "10.0.0.1"}, "k8sServiceHost is set but k8sServicePort is not"),
        ({"k8sServicePort": 6443}, "k8sServicePort is set but k8sServiceHost is not"),
        ({"healthPort": 9962}, "prometheus.port and healthPort are both 9962"),
        (
            {"prometheus": {"enabled": False, "serviceMonitor": {"enabled": True}}},
            "prometheus.serviceMonitor.enabled=true needs prometheus.enabled=true",
        ),
        ({"cni": {"install": False, "exclusive": True}}, "cni.exclusive=true needs cni.install=true"),
        ({"cni": {"binPath": "/opt/cni", "confPath": "/opt/cni/"}}, "must be different directories"),
        ({"nodePort": {"range": "32767,30000"}}, "nodePort.range"),
        ({"nodePort": {"range": "0,100"}}, "nodePort.range"),
        ({"extraConfig": {"no-such-setting": "1"}}, "extraConfig.no-such-setting: not an agent setting"),
        (
            {"extraConfig": {"mtu": "9000"}},
            "extraConfig.mtu: this agent setting is derived from the chart's values",
        ),
        ({"extraConfig": {"node-name": "n1"}}, "extraConfig.node-name: not an agent setting"),
    ],
)
def test_invalid_combinations_fail(helm: Helm, values: dict[str, Any], message: str) -> None:
    err = helm.template_error(values)
    assert "execution error" in err, err
    assert message in err, err
