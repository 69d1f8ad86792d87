"""A load generator for the churn test, run inside a pod's network namespace:

    python load.py HOST PORT --seconds S [--timeout T] [--interval I]

Opens one TCP connection per request, back to back, for S seconds; prints one JSON object: total,
ok, the answering pods with their counts, and every failure with its time and kind. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import socket
import time


def one(host: str, port: int, timeout: float) -> tuple[str, str]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
        return ("ok", body.split(" ")[0]) if body else ("empty", "")
    except (ConnectionRefusedError, ConnectionResetError):
        return "refused", ""
    except TimeoutError:
        return "timeout", ""
    except OSError as e:
        return f"error {e.errno}", ""
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--timeout", type=float, default=2)
    ap.add_argument("--interval", type=float, default=0.01)
    a = ap.parse_args()
    start = time.monotonic()
    total, ok = 0, 0
    pods: dict[str, int] = {}
    failures: list[dict[str, object]] = []
    while time.monotonic() - start < a.seconds:
        t = time.monotonic() - start
        result, pod = one(a.host, a.port, a.timeout)
        total += 1
        if result == "ok":
            ok += 1
            pods[pod] = pods.get(pod, 0) + 1
        else:
            failures.append({"t": round(t, 3), "result": result})
        time.sleep(a.interval)
    print(json.dumps({"total": total, "ok": ok, "pods": pods, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
