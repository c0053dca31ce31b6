"""`rlpt lab`: serve the lab (rlpt/lab/app.py) with uvicorn.

    rlpt lab [--port 8765] [--host 127.0.0.1] [--runs runs] [--allow-remote]

It binds the loopback interface unless told otherwise: a non-loopback --host is refused without --allow-remote
(the lab has no authentication; anyone who can reach the port can read the run folders under --runs), and with
it a warning is printed.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:       # a host name: only "localhost" is known to be loopback
        return False


def check_host(host: str, allow_remote: bool) -> str | None:
    """-> a warning to print for an allowed remote bind, None for loopback; ConfigError if not allowed."""
    if is_loopback(host):
        return None
    if not allow_remote:
        from rlpt.config import ConfigError
        raise ConfigError(f"--host {host} is not a loopback address: the lab has no authentication and would serve "
                          f"your run folders to the network; add --allow-remote if that is what you want")
    return (f"rlpt lab: WARNING: serving on {host}, reachable from other machines, without authentication; "
            "anyone who can reach this port can read the run folders under --runs")


def cmd_lab(args) -> int:
    warning = check_host(args.host, args.allow_remote)
    if warning:
        print(warning, file=sys.stderr)
    # the widgets' tensors are tiny: more threads only add overhead (and the lab shares the machine)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import uvicorn

    from rlpt.lab.app import create_app
    app = create_app(args.runs)
    print(f"rlpt lab: http://{args.host}:{args.port}/  (runs from {os.path.abspath(args.runs)}; Ctrl-C stops)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("lab", help="the course's widgets on rlpt's own code, and your runs, in the browser",
                       description="Serve the lab: one page per lesson whose widget runs rlpt's functions, and a "
                                   "dashboard of the run folders under --runs.")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--runs", default="runs", help="the directory whose run folders the dashboard shows")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (prints a warning)")
    p.set_defaults(fn=cmd_lab)


if __name__ == "__main__":   # python -m rlpt.lab.cli: the command without the rest of rlpt's parser
    parser = argparse.ArgumentParser(prog="rlpt")
    add_commands(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["lab", *sys.argv[1:]])
    raise SystemExit(a.fn(a))
