"""Connection-rate client for the datapath benchmarks: open, request, read, close, for N seconds.

`python -m bench.connrate HOST PORT SECONDS` prints {"conns": n, "errors": e, "seconds": s}.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def run(host: str, port: int, seconds: float) -> dict[str, float]:
    conns = errors = 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((host, port))
            s.sendall(b"x")
            if s.recv(256):
                conns += 1
            else:
                errors += 1
        except OSError:
            errors += 1
        finally:
            s.close()
    return {"conns": conns, "errors": errors, "seconds": time.monotonic() - t0}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
