"""The process a lab pod runs: answers on every declared port with its name and the client address.

TCP: an HTTP/1.0 response whose body is `<name> <client-ip>:<client-port>`; a plain TCP client that
sends anything gets the same body. UDP: one datagram with the same text per datagram received.
Usage: python -m pycilium.lab.podserver --name NAME [--tcp PORT ...] [--udp PORT ...]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def _tcp_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s


def _udp_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    return s


def _tcp(s: socket.socket, name: str) -> None:
    while True:
        conn, addr = s.accept()
        threading.Thread(target=_serve_tcp, args=(conn, addr, name), daemon=True).start()


def _serve_tcp(conn: socket.socket, addr: tuple[str, int], name: str) -> None:
    with conn:
        conn.settimeout(5)
        try:
            first = conn.recv(4096)
        except OSError:
            return
        body = f"{name} {addr[0]}:{addr[1]}\n".encode()
        if first.startswith((b"GET ", b"HEAD ", b"POST ")):
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n"
            conn.sendall(head.encode() + body)
        else:
            conn.sendall(body)


def _udp(s: socket.socket, name: str) -> None:
    while True:
        _, addr = s.recvfrom(2048)
        s.sendto(f"{name} {addr[0]}:{addr[1]}\n".encode(), addr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    a = ap.parse_args(argv)
    # every socket is bound before anything is served: a port that is taken (a host-network pod
    # whose port is used on the node) ends the process with a message instead of a silent thread
    try:
        tcp = [_tcp_socket(p) for p in a.tcp]
        udp = [_udp_socket(p) for p in a.udp]
    except OSError as e:
        print(f"cannot listen: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    threads = [threading.Thread(target=_tcp, args=(s, a.name), daemon=True) for s in tcp]
    threads += [threading.Thread(target=_udp, args=(s, a.name), daemon=True) for s in udp]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
