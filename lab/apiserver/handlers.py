"""HTTP routing: Kubernetes API paths to the REST layer, discovery, health, faults.

One catch-all route parses the path itself, because custom resources appear and disappear at run
time:

    /api/v1/[watch/][namespaces/<ns>/]<plural>[/<name>[/status]]
    /apis/<group>/<version>/[watch/][namespaces/<ns>/]<plural>[/<name>[/status]]

plus the subresources of subresources.py (`deployments/<name>/scale`, `pods/<name>/binding`) and
the create-only `bindings` collection.

Every response body is JSON; errors are `Status` objects. Request bodies are JSON, or YAML for
server-side apply (`application/apply-patch+yaml`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from . import discovery, protobuf, subresources, tables
from .errors import APIError, bad_request, status_object
from .patch import PATCH_TYPES
from .resources import ResourceType
from .selectors import parse_field_selector, parse_label_selector
from .watch import WatchParams, serve_watch

if TYPE_CHECKING:
    from .server import APIServer

log = logging.getLogger("pycilium.lab.apiserver")

Obj = dict[str, Any]

SERVER_KEY: web.AppKey[APIServer] = web.AppKey("apiserver")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def not_found_path() -> APIError:
    return APIError(404, "NotFound", "the server could not find the requested resource")


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    if not request.path.startswith("/_lab/"):
        mode = server.faults.refusing()
        if mode == "close":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError()  # nothing is sent: the client sees a dropped connection
        if mode == "503":
            resp = json_response(
                status_object(
                    503, "ServiceUnavailable", "the server is currently unable to handle the request"
                ),
                503,
            )
            resp.headers["Retry-After"] = "1"
            return resp
        if server.faults.delay_ms:
            await asyncio.sleep(server.faults.delay_ms / 1000)
    try:
        return await handler(request)
    except APIError as e:
        return json_response(e.status(), e.code)
    except web.HTTPException:
        raise
    except Exception as e:
        log.exception("internal error serving %s %s", request.method, request.path)
        return json_response(status_object(500, "InternalError", f"Internal error occurred: {e}"), 500)
    finally:
        server.after_request()


async def _body(request: web.Request) -> Any:
    ctype = request.content_type
    raw = await request.read()
    if "protobuf" in ctype:
        try:
            return protobuf.decode(raw)
        except protobuf.DecodeError as e:
            raise APIError(
                415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {e}"
            ) from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if "yaml" not in ctype:
            raise bad_request("the body of the request was in an unknown format: invalid JSON") from None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise bad_request(f"the body of the request was in an unknown format: {e}") from None


def _resource_route(server: APIServer, group: str, version: str, rest: list[str]) -> tuple[Any, ...]:
    """(rt, namespace, name, subresource, watch_prefix) for the path segments after the version."""
    watch_prefix = False
    if rest and rest[0] == "watch":
        watch_prefix, rest = True, rest[1:]
    ns: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        ns, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        raise not_found_path()
    rt = server.registry.get(group, version, rest[0])
    if rt is None or (ns is not None and not rt.namespaced):
        raise not_found_path()
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if (
        sub is not None
        and not (sub == "status" and rt.has_status)
        and not (sub == "finalize" and rt.plural == "namespaces")
        and sub not in rt.subresources
    ):
        raise not_found_path()
    if rt.namespaced and name is not None and ns is None:
        raise not_found_path()
    return rt, ns, name, sub, watch_prefix


async def handle(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    parts = [p for p in request.path.split("/") if p]
    reg = server.registry
    if not parts:
        return json_response({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/version"]})
    if parts[0] in ("healthz", "readyz", "livez"):
        return web.Response(text="ok")
    if parts == ["version"]:
        return json_response(discovery.version_info())
    if parts == ["openapi", "v2"]:
        if "protobuf" in request.headers.get("Accept", ""):
            return web.Response(
                body=discovery.OPENAPI_V2_PROTOBUF,
                content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )
        return json_response(discovery.OPENAPI_V2_JSON)
    if parts[0] == "_lab" and parts[1:] == ["faults"]:
        return await _faults(server, request)
    if request.method != "GET" and len(parts) <= (2 if parts[0] == "api" else 3):
        raise APIError(405, "MethodNotAllowed", f"the server does not allow this method on {request.path}")
    if parts[0] == "api":
        if len(parts) == 1:
            return json_response(discovery.api_versions(request.host))
        if parts[1] != "v1":
            raise not_found_path()
        if len(parts) == 2:
            return json_response(discovery.api_resource_list(reg, "", "v1"))
        return await _resource(server, request, "", "v1", parts[2:])
    if parts[0] == "apis":
        if len(parts) == 1:
            return json_response(discovery.api_group_list(reg))
        if len(parts) == 2:
            group_doc = discovery.api_group(reg, parts[1])
            if group_doc is None:
                raise not_found_path()
            return json_response(group_doc)
        if len(parts) == 3:
            doc = discovery.api_resource_list(reg, parts[1], parts[2])
            if doc is None:
                raise not_found_path()
            return json_response(doc)
        return await _resource(server, request, parts[1], parts[2], parts[3:])
    raise not_found_path()


async def _resource(
    server: APIServer, request: web.Request, group: str, version: str, rest: list[str]
) -> web.StreamResponse:
    rt, ns, name, sub, watch_prefix = _resource_route(server, group, version, rest)
    q = request.query
    api = server.api
    method = request.method
    dry_run = q.get("dryRun") == "All"
    status = sub == "status"
    ns_arg = ns or ""
    if sub in rt.subresources or "list" not in rt.verbs:
        if watch_prefix:
            raise not_found_path()
        return await _subresource(server, request, rt, ns_arg, name, sub)
    if method == "GET":
        table = tables.wants_table(request.headers.get("Accept", ""))
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"))
        if watch_prefix or q.get("watch") in ("true", "1"):
            if name is not None:
                fields = parse_field_selector(
                    ",".join(filter(None, [q.get("fieldSelector"), f"metadata.name={name}"]))
                )
            params = WatchParams.from_query(rt, ns, labels, fields, q, table=table)
            return await serve_watch(server, request, params)
        if name is None:
            try:
                limit = int(q.get("limit") or 0)
            except ValueError:
                raise bad_request(f"invalid limit {q.get('limit')!r}") from None
            lst = api.list_objects(rt, ns, labels, fields, limit, q.get("continue"))
            return json_response(tables.table(rt, lst["items"], lst["metadata"]) if table else lst)
        obj = api.get(rt, ns_arg, name)
        return json_response(tables.table(rt, [obj]) if table else obj)
    if name is None:
        if method == "POST":
            if rt.namespaced and ns is None:
                raise not_found_path()
            return json_response(api.create(rt, ns_arg, await _body(request), dry_run=dry_run), 201)
        if method == "DELETE":
            opts = await _delete_options(request)
            labels = parse_label_selector(q.get("labelSelector"))
            fields = parse_field_selector(q.get("fieldSelector"))
            return json_response(api.delete_collection(rt, ns, labels, fields, opts, dry_run=dry_run))
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
    if method == "PUT":
        return json_response(
            api.update(rt, ns_arg, name, await _body(request), status=status, dry_run=dry_run)
        )
    if method == "PATCH":
        kind = _patch_type(request)
        body = await _body(request)
        existed = server.store.get(rt.key, ns_arg if rt.namespaced else "", name) is not None
        obj = api.patch(rt, ns_arg, name, kind, body, status=status, dry_run=dry_run)
        return json_response(obj, 200 if existed else 201)
    if method == "DELETE":
        obj, finished = api.delete(rt, ns_arg, name, await _delete_options(request), dry_run=dry_run)
        return json_response(obj, 200 if finished else 202)
    raise APIError(405, "MethodNotAllowed", f"{method} is not supported")


def _patch_type(request: web.Request) -> str:
    """The patch kind of a PATCH request's content type (415 for an unknown one)."""
    kind = PATCH_TYPES.get(request.content_type)
    if kind is None:
        raise APIError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format: {request.content_type}",
        )
    return kind


async def _subresource(
    server: APIServer, request: web.Request, rt: ResourceType, ns: str, name: str | None, sub: str | None
) -> web.Response:
    """deployments/NAME/scale, pods/NAME/binding, and the create-only `bindings` collection."""
    api, method = server.api, request.method
    dry_run = request.query.get("dryRun") == "All"
    if sub == "scale" and name is not None:
        if method == "GET":
            return json_response(subresources.get_scale(api, rt, ns, name))
        if method == "PUT":
            return json_response(
                subresources.update_scale(api, rt, ns, name, await _body(request), dry_run=dry_run)
            )
        if method == "PATCH":
            kind = _patch_type(request)
            body = await _body(request)
            return json_response(subresources.patch_scale(api, rt, ns, name, kind, body, dry_run=dry_run))
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported on {rt.plural}/scale")
    pods = server.registry.get("", "v1", "pods")
    binding = (sub == "binding" and name is not None) or (sub is None and name is None and ns != "")
    if pods is not None and binding:
        if method != "POST":
            raise APIError(405, "MethodNotAllowed", f"{method} is not supported on a binding")
        status = subresources.bind(api, pods, ns, name, await _body(request), dry_run=dry_run)
        return json_response(status, 201)
    raise not_found_path()


async def _delete_options(request: web.Request) -> Obj:
    body = await _body(request)
    opts: Obj = body if isinstance(body, dict) else {}
    if "gracePeriodSeconds" in request.query:
        try:
            opts["gracePeriodSeconds"] = int(request.query["gracePeriodSeconds"])
        except ValueError:
            raise bad_request("invalid gracePeriodSeconds") from None
    return opts


async def _faults(server: APIServer, request: web.Request) -> web.Response:
    if request.method == "GET":
        return json_response(server.faults.state())
    if request.method != "POST":
        raise APIError(405, "MethodNotAllowed", "use GET or POST on /_lab/faults")
    spec = await _body(request)
    if not isinstance(spec, dict):
        raise bad_request("expected a JSON object with an 'action'")
    return json_response(server.faults.apply(spec))


def resolve(server: APIServer, name: str) -> ResourceType:
    rt = server.registry.find(name)
    if rt is None:
        raise bad_request(f"unknown resource {name!r}")
    return rt
