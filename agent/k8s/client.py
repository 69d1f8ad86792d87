"""Kubernetes API client factory and raw-JSON request helpers.

The agent talks to the API server with the official `kubernetes` client (v37) but never builds its
model objects: every read goes through `ApiClient.call_api` and is decoded with `json.loads` into
plain dicts. The generated models are pydantic objects several times the size of the JSON they come
from, and at 10,000 Services and 30,000 endpoints that difference decides whether the agent fits
its memory budget. Auth, TLS and proxies still come from the client's `Configuration`.

Where the configuration comes from, in order:
1. `kubeconfig` (a path): `load_kube_config`;
2. in-cluster (service-account token mounted): `InClusterConfigLoader`, whose host/port can be
   overridden with `k8s_service_host` / `k8s_service_port` (for clusters where the `kubernetes`
   Service itself is implemented by this agent and cannot be used to reach the API server);
3. only `k8s_service_host`: a plain URL, no auth (the lab API server).
An explicit host override always wins over what the kubeconfig says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import SERVICE_CERT_FILENAME, SERVICE_TOKEN_FILENAME

Obj = dict[str, Any]
Query = Sequence[tuple[str, Any]]

DEFAULT_REQUEST_TIMEOUT = (10.0, 60.0)  # (connect, read) seconds for non-watch requests


class ClientConfigError(RuntimeError):
    """No usable API server configuration."""


def _url(host: str, port: int | None, tls: bool) -> str:
    if host.startswith(("http://", "https://")):
        return host.rstrip("/") if port is None else f"{host.rstrip('/')}:{port}"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if tls else "http"
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def make_configuration(
    *,
    kubeconfig: str | None = None,
    k8s_service_host: str | None = None,
    k8s_service_port: int | None = None,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
    token_file: str = SERVICE_TOKEN_FILENAME,
    cert_file: str = SERVICE_CERT_FILENAME,
) -> k8s_client.Configuration:
    """A client `Configuration` from a kubeconfig, the in-cluster service account or a host override."""
    env = dict(os.environ if environ is None else environ)
    cfg = k8s_client.Configuration()
    if kubeconfig:
        if not os.path.exists(kubeconfig):
            raise ClientConfigError(f"kubeconfig {kubeconfig} does not exist")
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        if k8s_service_host:
            cfg.host = _url(k8s_service_host, k8s_service_port, cfg.host.startswith("https"))
    elif os.path.exists(token_file):
        if k8s_service_host:
            env["KUBERNETES_SERVICE_HOST"] = k8s_service_host
            env["KUBERNETES_SERVICE_PORT"] = str(k8s_service_port or 443)
        try:
            k8s_config.incluster_config.InClusterConfigLoader(
                token_filename=token_file, cert_filename=cert_file, environ=env
            ).load_and_set(client_configuration=cfg)
        except k8s_config.ConfigException as e:
            raise ClientConfigError(f"in-cluster configuration failed: {e}") from e
    elif k8s_service_host:
        cfg.host = _url(k8s_service_host, k8s_service_port, tls=False)
    else:
        raise ClientConfigError(
            "no Kubernetes API configuration: set kubeconfig or k8s-service-host, or run in a pod "
            f"with a service-account token at {token_file}"
        )
    # Watches are long-lived requests; keep TCP keepalive on so a dead peer is noticed.
    cfg.keep_alive = True  # type: ignore[attr-defined]
    return cfg


def new_api_client(config: object | None = None, **kwargs: Any) -> k8s_client.ApiClient:
    """An `ApiClient` for the agent: from an AgentConfig-like object and/or keyword overrides.

    Reads `kubeconfig`, `k8s_service_host` and `k8s_service_port` from `config` when given;
    keyword arguments (same names, see `make_configuration`) take precedence.
    """
    opts: dict[str, Any] = {}
    for name in ("kubeconfig", "k8s_service_host", "k8s_service_port"):
        if config is not None and getattr(config, name, None) is not None:
            opts[name] = getattr(config, name)
    opts.update({k: v for k, v in kwargs.items() if v is not None})
    api = k8s_client.ApiClient(make_configuration(**opts))
    api.user_agent = "pycilium-agent"
    return api


class APIError(RuntimeError):
    """A non-2xx answer from the API server, with its HTTP status and Status reason."""

    def __init__(self, status: int, reason: str, message: str, body: Obj | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message, self.body = status, reason, message, body


def _error_from(status: int, http_reason: str, raw: bytes) -> APIError:
    body: Obj | None = None
    try:
        parsed = json.loads(raw) if raw else None
        body = parsed if isinstance(parsed, dict) else None
    except ValueError:
        body = None
    reason = (body or {}).get("reason") or http_reason or ""
    message = (body or {}).get("message") or raw[:200].decode(errors="replace")
    return APIError(status, str(reason), str(message), body)


def open_request(
    api: k8s_client.ApiClient,
    method: str,
    path: str,
    *,
    query: Query = (),
    body: Any = None,
    content_type: str | None = None,
    timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
) -> Any:
    """Send a request and return the unread urllib3 response (for streaming); raises APIError."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type or "application/json"
    method_, url, hdrs, body_, post = api.param_serialize(
        method,
        path,
        query_params=list(query),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    try:
        resp = api.call_api(method_, url, header_params=hdrs, body=body_, post_params=post,
                            _request_timeout=timeout)  # fmt: skip
    except ApiException as e:
        raise APIError(int(e.status or 0), str(e.reason or ""), str(e.body or "")) from e
    raw = resp.response
    if not 200 <= resp.status <= 299:
        data = raw.data
        raw.release_conn()
        raise _error_from(resp.status, str(resp.reason or ""), data)
    return raw


def request_json(
    api: k8s_client.ApiClient,
    method: str,
    path: str,
    *,
    query: Query = (),
    body: Any = None,
    content_type: str | None = None,
    timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
) -> Obj:
    """One request; the JSON answer as a dict. Raises APIError on non-2xx."""
    raw = open_request(api, method, path, query=query, body=body, content_type=content_type, timeout=timeout)
    try:
        data = raw.data
    finally:
        raw.release_conn()
    out = json.loads(data) if data else {}
    return out if isinstance(out, dict) else {"items": out}
