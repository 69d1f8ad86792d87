"""`pycilium`: inspect and debug a node's datapath and agent.

Commands under `bpf` read the pinned maps directly, so they work while the agent is down; `service`,
`endpoint`, `identity` and `status` ask the agent over its gRPC socket; `monitor` reads the live
event stream of the datapath. Every list takes `-o json`.

Start-up is kept fast: this module imports only argparse; each command imports what it needs when
it runs (the bpf commands never import bcc or grpc).

Exit codes: 0 ok; 1 error; 2 not available (map not pinned, agent unreachable) or bad arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

DEFAULT_BPF_ROOT = "/sys/fs/bpf/pycilium"  # = agent.config.DEFAULT_BPF_ROOT (checked by a test)
DEFAULT_SOCKET = "/var/run/pycilium/pycilium.sock"  # = AgentConfig().socket_path

EPILOG = f"""\
exit codes:
  0  success
  1  error
  2  not available (maps not pinned / agent not reachable: is the agent running on this node?)
     or malformed arguments

environment:
  PYCILIUM_BPF_ROOT  default for --bpf-root ({DEFAULT_BPF_ROOT})
  PYCILIUM_SOCKET    default for -H/--host ({DEFAULT_SOCKET})
"""


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """A command handler that imports its module only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(f"pycilium.cli.{module}"), func)(args))

    run.__name__ = f"{module}.{func}"
    return run


def _positive_int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def _u16(text: str) -> int:
    v = _positive_int(text)
    if v > 0xFFFF:
        raise argparse.ArgumentTypeError(f"endpoint id out of range (0-65535): {text!r}")
    return v


def _ipv4(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def _cidr(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.IPv4Network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 CIDR: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    # Options accepted both before and after the command; SUPPRESS keeps a subcommand from
    # overwriting what was given at the top level with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bpf-root", default=argparse.SUPPRESS, help="bpffs directory of the node's pinned maps"
    )
    common.add_argument(
        "-H", "--host", default=argparse.SUPPRESS, help="agent API socket (path or unix://path)"
    )
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("-o", "--output", choices=["text", "json"], default=argparse.SUPPRESS,
                         help="output format (default text)")  # fmt: skip

    parser = argparse.ArgumentParser(
        prog="pycilium",
        description="Inspect and debug pycilium: datapath maps, services, endpoints, identities, events.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bpf-root", default=os.environ.get("PYCILIUM_BPF_ROOT", DEFAULT_BPF_ROOT),
                        help="bpffs directory of the node's pinned maps (default: %(default)s)")  # fmt: skip
    parser.add_argument("-H", "--host", default=os.environ.get("PYCILIUM_SOCKET", DEFAULT_SOCKET),
                        help="agent API socket, path or unix://path (default: %(default)s)")  # fmt: skip
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ---- bpf: pinned maps ------------------------------------------------------------------------
    bpf = sub.add_parser("bpf", help="read the datapath's pinned BPF maps (works without the agent)",
                         description="Read and manage the datapath's pinned BPF maps directly.")  # fmt: skip
    bsub = bpf.add_subparsers(dest="bpf_command", metavar="MAP", required=True)

    ct = bsub.add_parser("ct", help="conntrack tables")
    ctsub = ct.add_subparsers(dest="ct_command", metavar="COMMAND", required=True)
    p = ctsub.add_parser("list", parents=[common, listing], help="list conntrack entries",
                         description="List ct4_global (TCP) and ct_any4_global (UDP, ICMP, ...) in Cilium's "
                         "line format. -d prints the seconds left before expiry; 0 or negative means "
                         "expired and not yet garbage-collected.")  # fmt: skip
    p.add_argument("scope", choices=["global"], help="table to list (global)")
    p.add_argument(
        "-d", "--time-diff", action="store_true", help="print the remaining lifetime of each entry"
    )
    p.set_defaults(func=_lazy("bpf_ct", "cmd_list"))
    p = ctsub.add_parser("flush", parents=[common], help="delete every conntrack entry")
    p.add_argument("scope", choices=["global"], help="table to flush (global)")
    p.set_defaults(func=_lazy("bpf_ct", "cmd_flush"))

    nat = bsub.add_parser("nat", help="the SNAT table (snat_v4_external)")
    natsub = nat.add_subparsers(dest="nat_command", metavar="COMMAND", required=True)
    p = natsub.add_parser("list", parents=[common, listing], help="list NAT entries")
    p.set_defaults(func=_lazy("bpf_nat", "cmd_list"))
    p = natsub.add_parser("flush", parents=[common], help="delete every NAT entry")
    p.set_defaults(func=_lazy("bpf_nat", "cmd_flush"))

    lb = bsub.add_parser("lb", help="load-balancer maps")
    lbsub = lb.add_subparsers(dest="lb_command", metavar="COMMAND", required=True)
    p = lbsub.add_parser("list", parents=[common, listing], help="list services and their backend slots")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--revnat", action="store_true", help="list the reverse-NAT table")
    g.add_argument("--frontends", action="store_true", help="list only the service (slot 0) entries")
    g.add_argument("--backends", action="store_true", help="list the backends table")
    p.set_defaults(func=_lazy("bpf_lb", "cmd_list"))

    ipc = bsub.add_parser("ipcache", help="IP -> identity cache")
    ipcsub = ipc.add_subparsers(dest="ipcache_command", metavar="COMMAND", required=True)
    p = ipcsub.add_parser("list", parents=[common, listing], help="list ipcache entries")
    p.set_defaults(func=_lazy("bpf_ipcache", "cmd_list"))
    p = ipcsub.add_parser("get", parents=[common, listing], help="look an IP up (longest-prefix match)")
    p.add_argument("ip", type=_ipv4, help="IPv4 address")
    p.set_defaults(func=_lazy("bpf_ipcache", "cmd_get"))

    pol = bsub.add_parser("policy", help="per-endpoint policy entries")
    polsub = pol.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    p = polsub.add_parser("get", parents=[common, listing], help="list an endpoint's policy entries",
                          description="List the policy entries of an endpoint (or of all endpoints). "
                          "Identity labels come from the agent when it is reachable; otherwise the "
                          "numeric identity is printed (reserved identities always have labels).")  # fmt: skip
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("endpoint", nargs="?", type=_u16, help="endpoint id")
    g.add_argument("--all", action="store_true", help="every endpoint")
    p.add_argument("-n", "--numeric", action="store_true", help="print numeric identities instead of labels")
    p.set_defaults(func=_lazy("bpf_policy", "cmd_get"))

    ep = bsub.add_parser("endpoint", help="local endpoints map")
    epsub = ep.add_subparsers(dest="endpoint_command", metavar="COMMAND", required=True)
    p = epsub.add_parser("list", parents=[common, listing], help="list local endpoints")
    p.set_defaults(func=_lazy("bpf_endpoint", "cmd_list"))

    met = bsub.add_parser("metrics", help="datapath forward/drop counters")
    metsub = met.add_subparsers(dest="metrics_command", metavar="COMMAND", required=True)
    p = metsub.add_parser("list", parents=[common, listing], help="list counters (summed over CPUs)")
    p.set_defaults(func=_lazy("bpf_metrics", "cmd_list"))

    pf = bsub.add_parser("prefilter", help="XDP CIDR prefilter")
    pfsub = pf.add_subparsers(dest="prefilter_command", metavar="COMMAND", required=True)
    p = pfsub.add_parser("list", parents=[common, listing], help="list dropped source CIDRs")
    p.set_defaults(func=_lazy("bpf_prefilter", "cmd_list"))
    p = pfsub.add_parser("update", parents=[common], help="drop traffic from these source CIDRs")
    p.add_argument("cidrs", nargs="+", type=_cidr, metavar="CIDR")
    p.set_defaults(func=_lazy("bpf_prefilter", "cmd_update"))
    p = pfsub.add_parser("delete", parents=[common], help="stop dropping these source CIDRs")
    p.add_argument("cidrs", nargs="+", type=_cidr, metavar="CIDR")
    p.set_defaults(func=_lazy("bpf_prefilter", "cmd_delete"))

    # ---- monitor ---------------------------------------------------------------------------------
    p = sub.add_parser("monitor", parents=[common, listing], help="print datapath events as they happen",
                       description="Print drop, trace and policy-verdict events from the datapath "
                       "(reads the pinned perf event array directly; one monitor per node at a time).")  # fmt: skip
    p.add_argument("-t", "--type", action="append", choices=["drop", "trace", "policy-verdict"], dest="types",
                   help="only these event types (repeatable)")  # fmt: skip
    p.add_argument("--related-to", type=_u16, action="append", metavar="EPID",
                   help="only events of this endpoint (repeatable)")  # fmt: skip
    p.add_argument(
        "-c", "--count", type=_positive_int, default=0, help="exit after N events (0: run until ^C)"
    )
    p.set_defaults(func=_lazy("monitor", "cmd_monitor"), _monitor=True)

    # ---- agent API -------------------------------------------------------------------------------
    svc = sub.add_parser("service", help="services known to the agent")
    svcsub = svc.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    p = svcsub.add_parser("list", parents=[common, listing], help="list services and backends")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_service_list"))

    epa = sub.add_parser("endpoint", help="endpoints managed by the agent")
    epasub = epa.add_subparsers(dest="endpoint_command", metavar="COMMAND", required=True)
    p = epasub.add_parser("list", parents=[common, listing], help="list endpoints")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_endpoint_list"))
    p = epasub.add_parser("get", parents=[common, listing], help="show one endpoint")
    p.add_argument("id", type=_u16, help="endpoint id")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_endpoint_get"))
    p = epasub.add_parser("delete", parents=[common], help="delete an endpoint from the agent")
    p.add_argument("id", type=_u16, help="endpoint id")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_endpoint_delete"))

    ida = sub.add_parser("identity", help="security identities")
    idasub = ida.add_subparsers(dest="identity_command", metavar="COMMAND", required=True)
    p = idasub.add_parser("list", parents=[common, listing], help="list identities and their labels")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_identity_list"))
    p = idasub.add_parser("get", parents=[common, listing], help="show one identity")
    p.add_argument("id", type=_positive_int, help="numeric identity")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_identity_get"))

    p = sub.add_parser("status", parents=[common, listing], help="agent and datapath status")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--brief", action="store_true", help="one line: OK or what is wrong")
    g.add_argument("--verbose", action="store_true", help="all details")
    p.set_defaults(func=_lazy("agent_cmds", "cmd_status"))

    # ---- lab (its own argument parsing) ----------------------------------------------------------
    p = sub.add_parser("lab", add_help=False, help="local multi-node lab (pycilium lab --help)")
    p.add_argument("lab_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_lab)
    return parser


def _run_lab(args: argparse.Namespace) -> int:
    import importlib

    from pycilium.cli.errors import CliError

    try:
        lab_cli = importlib.import_module("pycilium.lab.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("pycilium.lab", "pycilium.lab.cli"):
            raise
        raise CliError("the lab is not available in this installation (pycilium.lab.cli)") from None
    return int(lab_cli.main(list(args.lab_args)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pycilium")
    except PackageNotFoundError:
        return "unknown"


_GLOBAL_WITH_VALUE = {"--bpf-root", "-H", "--host", "-o", "--output"}


def _lab_argv(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `lab` when the command is `lab` (passed on untouched, --help included)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in _GLOBAL_WITH_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return list(argv[i + 1 :]) if a == "lab" else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    lab_args = _lab_argv(sys.argv[1:] if argv is None else argv)
    if lab_args is not None:
        from pycilium.cli.errors import CliError

        try:
            return _run_lab(argparse.Namespace(lab_args=lab_args))
        except CliError as e:
            sys.stderr.write(f"Error: {e}\n")
            return e.code
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "bpf" or "bpf" in (argv if argv is not None else sys.argv[1:])[:3]:
        from pycilium.bpf.bpffs import ensure_host_bpffs

        ensure_host_bpffs()  # under `ip netns exec` the host's bpffs is hidden; see bpf/bpffs.py
    if args.version:
        print(f"pycilium {_version()}")
        return 0
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    if not getattr(args, "_monitor", False) and argv is None:
        # Behave like other Unix tools in pipelines (`... | head`): die quietly on SIGPIPE.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    from pycilium.cli.errors import CliError

    try:
        return func(args)
    except CliError as e:
        sys.stdout.flush()
        sys.stderr.write(f"Error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
