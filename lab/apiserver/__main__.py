"""Run the lab API server: `python -m pycilium.lab.apiserver --host 127.0.0.1 --port 0 --state FILE`.

Prints the base URL on stdout once it is listening; SIGINT/SIGTERM save the state file and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .kubeconfig import write_kubeconfig
from .server import APIServer, ServerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pycilium.lab.apiserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    p.add_argument("--state", default=None, help="JSON state file: loaded at start, saved after writes")
    p.add_argument("--service-cidr", default="10.96.0.0/12")
    p.add_argument("--node-port-range", default="30000-32767", help="LOW-HIGH")
    p.add_argument("--history-size", type=int, default=1000, help="watch events kept per resource")
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch bookmarks")
    p.add_argument("--graceful-pod-deletion", action="store_true", help="bound Pods wait for the kubelet")
    p.add_argument(
        "--advertise-address",
        default=None,
        help="the address clients reach this server at: the default/kubernetes Service points there",
    )
    p.add_argument("--advertise-port", type=int, default=0, help="with --advertise-address (default: --port)")
    p.add_argument("--kubeconfig", default=None, help="also write a kubeconfig for the server here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    lo, _, hi = args.node_port_range.partition("-")
    server = APIServer(
        ServerConfig(
            host=args.host,
            port=args.port,
            state_file=args.state,
            service_cidr=args.service_cidr,
            node_port_range=(int(lo), int(hi)),
            history_size=args.history_size,
            bookmark_interval=args.bookmark_interval,
            graceful_pod_deletion=args.graceful_pod_deletion,
            advertise_address=args.advertise_address,
            advertise_port=args.advertise_port,
        )
    )
    url = await server.start()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, url)
    print(url, flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
