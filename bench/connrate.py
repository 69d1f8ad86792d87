"""Connection-rate client for the datapath benchmarks: open, request, read, close, for N seconds.

`python -m bench.connrate HOST PORT SECONDS` prints {"conns": n, "errors": e, "seconds": s}.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

# Close with RST (SO_LINGER 0): no TIME_WAIT on either side, so later runs reusing client ports
# through a NAT never collide with a backend's TIME_WAIT socket of an earlier run.
_LINGER0 = struct.pack("ii", 1, 0)


def run(host: str, port: int, seconds: float) -> dict[str, float]:
    conns = errors = 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
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
