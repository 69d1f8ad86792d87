"""Client side of the lab's pods: connect to HOST:PORT and report ok / refused / timeout.

`python -m pycilium.lab.probe HOST PORT [--proto tcp|udp] [--timeout S] [--count N] [--sport P]`
prints one JSON object per attempt: {"result": "ok"|"refused"|"timeout", "reply": "<pod> <ip>:<port>"}.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket


def probe(host: str, port: int, proto: str = "tcp", timeout: float = 2.0, sport: int = 0) -> dict[str, str]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind)
    s.settimeout(timeout)
    try:
        if sport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", sport))
        s.connect((host, port))
        s.send(b"GET / HTTP/1.0\r\n\r\n" if proto == "tcp" else b"ping")
        data = s.recv(4096).decode(errors="replace")
        if "\r\n\r\n" in data:
            data = data.split("\r\n\r\n", 1)[1]
        return {"result": "ok", "reply": data.strip()}
    except (ConnectionRefusedError, ConnectionResetError):
        return {"result": "refused", "reply": ""}
    except TimeoutError:
        return {"result": "timeout", "reply": ""}
    except OSError as e:
        # EPERM: a service without backends refused by socket load-balancing in connect()
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED, errno.EPERM):
            return {"result": "refused", "reply": ""}
        raise
    finally:
        s.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--sport", type=int, default=0)
    a = ap.parse_args(argv)
    ok = True
    for _ in range(a.count):
        r = probe(a.host, a.port, a.proto, a.timeout, a.sport)
        ok = ok and r["result"] == "ok"
        print(json.dumps(r), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
