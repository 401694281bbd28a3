"""`safeedit serve`: run the proxy with uvicorn, in one process or `--workers N`.

SIGTERM drains (guard.http.middleware.drain): the proxy goes unready and refuses new requests with a 503 while
the ones in flight finish (at most `server.drain_timeout_s`), then it shuts down (traces and
anchors flushed) and exits 0. With workers, the parent passes SIGTERM on and every worker drains.
"""

from __future__ import annotations

import argparse
import functools
import gc
import ipaddress
import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from multiprocessing.context import SpawnProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from guard.http.middleware.drain import Drain
from guard.support.registry import resolve

if TYPE_CHECKING:
    from guard.core.config import Config

log = logging.getLogger("safeedit.serve")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names
CUT_AFTER_DRAIN_S = 1  # how long requests cancelled at the drain timeout have to answer


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the proxy (embedded defaults without --config)")
    p.add_argument("--config", help="operators' config file (YAML); `safeedit config example` "
                                    "prints one with every option")
    p.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from config: 8000)")
    p.add_argument("--policies", action="append", default=[], metavar="DIR",
                   help="a folder (or file) of policies; repeatable. Read after the shipped "
                        "policies, ./policies/ and the config's policy_paths: later ones win on "
                        "equal ids")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
                   help="what the proxy logs (default: %(default)s)")
    p.add_argument("--accept-log-reset", action="store_true",
                   help="start although the audit log no longer matches its last signed tree "
                        "head (wiped, cut, forked, or its head sink lost): begins a new history "
                        "and records the reset in the log")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes serving the one port, each with its own state "
                        "(default: %(default)s)")
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
    from guard.core.config import load_config
    from guard.core.policy import POLICIES_DIR, local_policies_dir

    config = load_config(args.config)
    # The app reads the shipped policies, then `policy_paths`; the working directory's policies/
    # and --policies are a command-line convention, so they are folded in here.
    local = local_policies_dir()
    config = config.model_copy(update={"policy_paths": [
        *([str(local)] if local else []), *config.policy_paths, *args.policies]})
    host = args.host or config.server.host
    # The bind address is a trusted Host by default (guard.http.middleware.hosts), so --host goes into the config.
    config = config.model_copy(update={"server": config.server.model_copy(update={"host": host})})
    port = args.port if args.port is not None else config.server.port
    if args.accept_log_reset:
        config = config.model_copy(update={"audit": {**config.audit, "accept_log_reset": True}})
    if args.workers < 1:
        print("safeedit: --workers must be 1 or more.", file=sys.stderr)
        return 2
    _log_to_stderr(args.log_level)
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
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(f"safeedit: listening on http://{host}:{port}/v1 (OpenAI base_url){workers}",
          file=sys.stderr)
    # The app is named, not imported: the core does not depend on its HTTP face (the import rule
    # in docs/ARCHITECTURE.md), and an operator may serve their own app factory. Resolved here
    # to fail early; each worker builds its own app (and state) from the name and the config.
    resolve(args.app)
    served = uvicorn.Config(functools.partial(_build_app, args.app, config), factory=True,
                            host=host, port=port, log_level=args.log_level, access_log=False,
                            lifespan="on",
                            # The app decides whose X-Forwarded-For counts (server.trusted_proxies,
                            # guard.http.middleware.forwarded), never uvicorn's own default.
                            proxy_headers=False)
    if args.workers == 1:
        DrainingServer(served, config.server.drain_timeout_s).run()
        return 0
    return _supervise(served, config.server.drain_timeout_s, args.workers, args.log_level)


def _build_app(target: str, config: Config) -> Any:
    return resolve(target)(config)


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that the first SIGTERM drains the app's `Drain` (published in
    its lifespan state) before stopping: the socket stays open, answering 503s, until nothing is
    in flight; at the drain timeout what still runs is cut (`Drain.cut`). uvicorn's own shutdown
    follows (it stops listening and runs the app's shutdown), and the process exits 0. SIGINT (stop now), or SIGTERM to an app without a Drain: uvicorn's own handling."""

    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self._drain_until: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What is alive once the app has started (modules, config, the loaded parts: hundreds of
        # thousands of objects) stays alive while serving: out of the cyclic collector's reach
        # (`gc.freeze`), each full collection walks only the objects made since.
        gc.collect()
        gc.freeze()

    def _drain(self) -> Drain | None:
        lifespan = getattr(self, "lifespan", None)  # set once serving starts
        found = lifespan.state.get("drain") if self.started and lifespan is not None else None
        return found if isinstance(found, Drain) else None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = self._drain()
        if sig == signal.SIGTERM and not self.started:
            # Still starting (a worker spawned a moment ago): nothing is in flight, so stop as
            # soon as startup ends and exit 0, instead of uvicorn's re-raise of the signal.
            self.should_exit = True
        elif sig != signal.SIGTERM or drain is None:
            super().handle_exit(sig, frame)
        elif self._drain_until is None:
            log.info("SIGTERM: draining, %d request(s) in flight, %g s at most",
                     drain.in_flight, self.drain_timeout_s)
            drain.begin()
            self._drain_until = time.monotonic() + self.drain_timeout_s
        # A SIGTERM while draining changes nothing: service managers signal every process of
        # the group, and a worker's parent passes the signal on as well.

    async def on_tick(self, counter: int) -> bool:
        drain = self._drain()
        if self._drain_until is not None and drain is not None and not self.should_exit:
            late = time.monotonic() - self._drain_until
            if late >= 0 and not drain.cut_short and drain.in_flight:
                log.warning("drain timeout: cancelling %d request(s) still in flight",
                            drain.in_flight)
                drain.cut()
            if drain.in_flight == 0 or late >= CUT_AFTER_DRAIN_S:
                # uvicorn's shutdown then waits only briefly for anything still running.
                self.config.timeout_graceful_shutdown = CUT_AFTER_DRAIN_S
                self.should_exit = True
        return await super().on_tick(counter)


def _supervise(config: uvicorn.Config, drain_timeout_s: float, workers: int,
               log_level: str) -> int:
    """`workers` processes accepting on one socket. SIGTERM or SIGINT here goes on to each as
    SIGTERM, so each drains; a worker that dies is replaced, unless it failed to start."""
    spawn = multiprocessing.get_context("spawn")
    sock = config.bind_socket()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def start() -> SpawnProcess:
        process = spawn.Process(target=_work, args=(config, drain_timeout_s, sock, log_level))
        process.start()
        return process

    processes = [start() for _ in range(workers)]
    failed = False
    while not stop.wait(0.5):
        for i, process in enumerate(processes):
            if process.exitcode is None:
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %d failed to start; stopping", process.pid)
                failed = True
                stop.set()
                break
            log.warning("worker %d exited (%s); starting another", process.pid, process.exitcode)
            processes[i] = start()
    for process in processes:
        if process.exitcode is None:
            process.terminate()  # SIGTERM: it drains
    for process in processes:
        process.join()
    sock.close()
    # A worker our SIGTERM reached before it set up its handlers dies of the signal; it served
    # nothing yet, so that is a clean stop too.
    return 1 if failed or any(process.exitcode not in (0, -signal.SIGTERM)
                              for process in processes) else 0


def _work(config: uvicorn.Config, drain_timeout_s: float, sock: socket.socket,
          log_level: str) -> None:
    """One worker process (spawned): its own app, state and Drain, on the shared socket."""
    config.configure_logging()
    _log_to_stderr(log_level)
    try:
        DrainingServer(config, drain_timeout_s).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the parent reports
