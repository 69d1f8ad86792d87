"""Fault injection: what a flaky control plane does to its clients, on demand.

The same faults are reachable in-process (`Faults` methods, or the thread wrapper's methods) and over
HTTP: `POST /_lab/faults` with one JSON action, `GET /_lab/faults` for the current state.

    {"action": "cut_watches", "graceful": false}   end every open watch now (abort the connection,
                                                    or with graceful=true end the chunked stream)
    {"action": "delay", "ms": 250}                  delay every response (0 turns it off)
    {"action": "gone", "resource": "pods", "count": 1}
                                                    the next `count` watches of that resource get
                                                    an ERROR event 410 Expired; without "resource",
                                                    the next watch of *every* resource does
    {"action": "refuse", "seconds": 3, "mode": "close"|"503", "cut_watches": true}
                                                    for N seconds close each new request's
                                                    connection without answering (or answer 503),
                                                    and by default cut the open watches too
    {"action": "trim_history", "resource": "pods"}  forget the watch event history (all if omitted)
    {"action": "clear"}                             turn every fault off

`/_lab/faults` itself is exempt from delays and refusals so a test can always turn them off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import bad_request
from .resources import ResourceType

Obj = dict[str, Any]


class Faults:
    def __init__(
        self,
        cut_watches: Callable[[bool], int],
        trim_history: Callable[[str | None], None],
    ) -> None:
        self._cut = cut_watches
        self._trim = trim_history
        self.delay_ms = 0
        self.refuse_until = 0.0
        self.refuse_mode = "close"
        self._gone: dict[str, int] = {}  # resource name -> watches still to fail
        self._gone_all = False
        self._gone_all_used: set[str] = set()

    # --- controls -----------------------------------------------------------------------------

    def cut_watches(self, graceful: bool = False) -> int:
        """End every open watch stream now; returns how many were cut."""
        return self._cut(graceful)

    def set_delay(self, ms: int) -> None:
        self.delay_ms = max(0, int(ms))

    def refuse(self, seconds: float, mode: str = "close", cut_watches: bool = True) -> None:
        if mode not in ("close", "503"):
            raise bad_request(f"refuse mode must be 'close' or '503', not {mode!r}")
        self.refuse_mode = mode
        self.refuse_until = time.monotonic() + float(seconds)
        if cut_watches:
            self._cut(False)

    def force_gone(self, resource: str | None = None, count: int = 1) -> None:
        if resource is None:
            self._gone_all = True
            self._gone_all_used = set()
        else:
            self._gone[resource] = self._gone.get(resource, 0) + max(1, int(count))

    def trim_history(self, resource: str | None = None) -> None:
        self._trim(resource)

    def clear(self) -> None:
        self.delay_ms = 0
        self.refuse_until = 0.0
        self._gone.clear()
        self._gone_all = False

    # --- queries used by the server -----------------------------------------------------------

    def refusing(self) -> str | None:
        """The refusal mode if connections are being refused right now."""
        return self.refuse_mode if time.monotonic() < self.refuse_until else None

    def take_gone(self, rt: ResourceType) -> bool:
        """True (once per injected fault) if this watch of `rt` must be answered with 410."""
        for name in (rt.plural, rt.qualified, rt.key):
            if self._gone.get(name, 0) > 0:
                self._gone[name] -= 1
                if not self._gone[name]:
                    del self._gone[name]
                return True
        if self._gone_all and rt.key not in self._gone_all_used:
            self._gone_all_used.add(rt.key)
            return True
        return False

    def state(self) -> Obj:
        left = max(0.0, self.refuse_until - time.monotonic())
        return {
            "delayMs": self.delay_ms,
            "refuseSecondsLeft": round(left, 3),
            "refuseMode": self.refuse_mode,
            "gone": dict(self._gone),
            "goneAll": self._gone_all,
        }

    def apply(self, spec: Obj) -> Obj:
        """Run one JSON action (the body of `POST /_lab/faults`); returns the resulting state."""
        action = spec.get("action")
        out: Obj = {}
        if action == "cut_watches":
            out["cut"] = self.cut_watches(bool(spec.get("graceful", False)))
        elif action == "delay":
            self.set_delay(int(spec.get("ms", 0)))
        elif action == "gone":
            self.force_gone(spec.get("resource"), int(spec.get("count", 1)))
        elif action == "refuse":
            self.refuse(
                float(spec.get("seconds", 0)), spec.get("mode", "close"), bool(spec.get("cut_watches", True))
            )
        elif action == "trim_history":
            self.trim_history(spec.get("resource"))
        elif action == "clear":
            self.clear()
        else:
            raise bad_request(f"unknown fault action {action!r}")
        return {**self.state(), **out}
