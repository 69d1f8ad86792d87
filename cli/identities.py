"""Identity -> labels for printing: fixed labels of reserved identities, the rest from the agent."""

from __future__ import annotations

from collections.abc import Iterable

from pycilium.bpf.maps.defines import d

# Reserved identities have fixed labels (identity 0 in a policy entry means "any identity", which
# Cilium lists as reserved:unknown).
RESERVED_LABELS: dict[int, list[str]] = {
    d("ID_UNKNOWN"): ["reserved:unknown"],
    d("ID_HOST"): ["reserved:host"],
    d("ID_WORLD"): ["reserved:world"],
    d("ID_UNMANAGED"): ["reserved:unmanaged"],
    d("ID_HEALTH"): ["reserved:health"],
    d("ID_INIT"): ["reserved:init"],
    d("ID_REMOTE_NODE"): ["reserved:remote-node"],
    d("ID_KUBE_APISERVER"): ["reserved:kube-apiserver", "reserved:remote-node"],
}


def resolve_labels(
    ids: Iterable[int], host: str, timeout: float = 2.0
) -> tuple[dict[int, list[str]], str | None]:
    """Labels for every id that has them; plus a note (for stderr) when the agent could not be asked.

    The agent is only contacted when a non-reserved identity is involved, and grpc is only
    imported when its socket exists.
    """
    wanted = set(ids)
    labels = {i: RESERVED_LABELS[i] for i in wanted if i in RESERVED_LABELS}
    missing = wanted - labels.keys()
    if not missing:
        return labels, None
    from pycilium.cli.agent_socket import socket_from_host, socket_problem

    path = socket_from_host(host)
    reason = socket_problem(path)
    if reason is None:
        from pycilium.cli.agent_client import AgentClient
        from pycilium.cli.errors import CliError

        try:
            with AgentClient(host, timeout=timeout) as client:
                for ident in client.list_identities():
                    if ident.id in missing:
                        labels[ident.id] = list(ident.labels)
            return labels, None
        except CliError as e:
            reason = str(e)
    return labels, f"note: {reason}; printing numeric identities instead of labels"
