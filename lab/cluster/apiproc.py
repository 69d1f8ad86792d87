"""The lab's API endpoint: one process that makes an API server reachable from the node namespaces
and from the host's loopback, without touching the host's network.

A socket belongs to the network namespace its creating thread was in, so a single process can
listen in one namespace and connect out of another. Two modes:

``serve``: the embedded API server (pycilium.lab.apiserver) listens inside the underlay namespace on
the bridge address (nodes reach it there); a second listener on the host's 127.0.0.1 forwards each
connection to it, so `kubectl` on the host works with a plain kubeconfig. It advertises the
``--listen`` address (or ``--advertise``): the `default/kubernetes` Service points there.

``proxy``: an existing API server (``lab up --kubeconfig``) that the node namespaces cannot reach:
a listener inside the underlay namespace forwards each connection, from the host's namespace, to
that server's address. TLS passes through untouched (node kubeconfigs set ``tls-server-name``).

    python -m pycilium.lab.cluster.apiproc serve --netns NS --listen IP:PORT --loopback-port P
        --state FILE --info FILE [--advertise IP:PORT]
    python -m pycilium.lab.cluster.apiproc proxy --netns NS --listen IP:PORT --target HOST:PORT
        --info FILE

Once listening it writes ``--info`` (JSON: pid, url, host_url) atomically; SIGTERM stops it (the
embedded server saves its state file first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from pycilium.lab.netns import in_netns

log = logging.getLogger("pycilium.lab.apiproc")


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"want HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def listen_socket(host: str, port: int, netns: str | None = None) -> socket.socket:
    """A listening TCP socket, created in `netns` (None: this thread's namespace)."""
    ctx = in_netns(netns) if netns else contextlib.nullcontext()
    with ctx:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(infos[0][4])
        s.listen(512)
        s.setblocking(False)
        return s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _connect(
    host: str, port: int, netns: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = in_netns(netns) if netns else contextlib.nullcontext()
    with ctx:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (host, port)), 10)
    except BaseException:
        s.close()
        raise
    return await asyncio.open_connection(sock=s)


def forwarder(host: str, port: int, netns: str | None = None) -> Callable[..., Any]:
    """A connection handler that splices the client to HOST:PORT (connected from `netns`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await _connect(host, port, netns)
        except (OSError, TimeoutError) as e:
            log.warning("forward to %s:%d failed: %s", host, port, e)
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        finally:
            for w in (writer, w2):
                with contextlib.suppress(Exception):
                    w.close()

    return handle


def write_info(path: str, info: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


async def _until_signalled() -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()


async def serve(args: argparse.Namespace) -> None:
    from pycilium.lab.apiserver import APIServer, ServerConfig

    host, port = split_hostport(args.listen)
    adv_host, adv_port = split_hostport(args.advertise or args.listen)
    loopback = listen_socket("127.0.0.1", args.loopback_port)  # the host's namespace
    lb_port = loopback.getsockname()[1]
    with in_netns(args.netns):  # the API server's sockets (and its threads) live in the underlay
        server = APIServer(
            ServerConfig(
                host=host,
                port=port,
                state_file=args.state,
                graceful_pod_deletion=True,
                advertise_address=adv_host,
                advertise_port=adv_port,
            )
        )
        url = await server.start()
        srv = await asyncio.start_server(forwarder(host, port), sock=loopback)
        write_info(args.info, {"pid": os.getpid(), "url": url, "host_url": f"http://127.0.0.1:{lb_port}"})
        print(url, flush=True)
        try:
            await _until_signalled()
        finally:
            srv.close()
            await server.stop()


async def proxy(args: argparse.Namespace) -> None:
    host, port = split_hostport(args.listen)
    thost, tport = split_hostport(args.target)
    lsock = listen_socket(host, port, args.netns)
    srv = await asyncio.start_server(forwarder(thost, tport), sock=lsock)  # connects from the host ns
    write_info(args.info, {"pid": os.getpid(), "url": f"{host}:{port}", "host_url": f"{thost}:{tport}"})
    print(f"{host}:{port} -> {thost}:{tport}", flush=True)
    try:
        await _until_signalled()
    finally:
        srv.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pycilium.lab.cluster.apiproc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--netns", required=True)
    s.add_argument("--listen", required=True)
    s.add_argument("--loopback-port", type=int, default=0)
    s.add_argument("--state", default=None)
    s.add_argument("--advertise", default=None, help="IP:PORT for default/kubernetes (default: --listen)")
    s.add_argument("--info", required=True)
    p = sub.add_parser("proxy")
    p.add_argument("--netns", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--info", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args) if args.mode == "serve" else proxy(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
