"""`safeedit serve`: run the proxy with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the proxy (embedded defaults without --config)")
    p.add_argument("--config", help="operators' config file (YAML); see examples/config.yaml")
    p.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from config: 8000)")
    p.add_argument("--policies", action="append", default=[], metavar="DIR",
                   help="a folder (or file) of policies; repeatable. Read after the shipped "
                        "policies, ./policies/ and the config's policy_paths: later ones win on "
                        "equal ids")
    p.add_argument("--log-level", default="info")
    p.add_argument("--app", default="proxy:create_app", metavar="MODULE:FACTORY",
                   help="the app factory to serve, called with the config (default: %(default)s)")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from guard.config import load_config
    from guard.policy import POLICIES_DIR, local_policies_dir
    from guard.registry import resolve

    config = load_config(args.config)
    # The app reads the shipped policies, then `policy_paths`; the working directory's policies/
    # and --policies are a command-line convention, so they are folded in here.
    local = local_policies_dir()
    config = config.model_copy(update={"policy_paths": [
        *([str(local)] if local else []), *config.policy_paths, *args.policies]})
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.open_mode:
        if not _is_loopback(host):
            print(f"safeedit: refusing to bind {host}: no API keys are configured (open mode "
                  "accepts any key), so the proxy binds to loopback only. Add `keys:` to the "
                  "config to serve other hosts.", file=sys.stderr)
            return 2
        print("safeedit: OPEN MODE - no API keys configured, any key is accepted, "
              f"loopback only ({host}).", file=sys.stderr)
    backends = ", ".join(f"{n} ({s['kind']})" for n, s in config.backends.items())
    print("safeedit: policies from " + ", ".join([str(POLICIES_DIR), *config.policy_paths]),
          file=sys.stderr)
    print(f"safeedit: judge {config.judge.get('kind', 'builtin')}, policy {config.policy}, "
          f"backends {backends}, audit {config.audit.get('kind', 'sqlite')}", file=sys.stderr)
    if any(s["kind"] == "demo" for s in config.backends.values()):
        print("safeedit: the DEMO backend draws the prompt as text; it is not an image model.",
              file=sys.stderr)
    print(f"safeedit: listening on http://{host}:{port}/v1 (OpenAI base_url)", file=sys.stderr)
    # The app is named, not imported: the core does not depend on its HTTP face (the import rule
    # in docs/ARCHITECTURE.md), and an operator may serve their own app factory.
    create_app = resolve(args.app)
    uvicorn.run(create_app(config), host=host, port=port, log_level=args.log_level,
                access_log=False)
    return 0
