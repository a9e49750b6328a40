"""Run the server: check everything that needs no weights, bind (a clear error for a port in
use), load the model once, then serve with uvicorn until SIGTERM or Ctrl-C.

Shutdown: uvicorn stops accepting connections and gives in-flight requests `grace_s` to
finish; whatever is still generating then is cancelled at its next token, the generation
thread is joined and the model closed. `serve` then returns normally (exit 0).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from typing import Any

from hetegen_cli.core.console import note, warn
from hetegen_cli.core.errors import InputError
from hetegen_cli.serve.model import ServeOptions, prepare_serving
from hetegen_cli.serve.worker import ModelThread


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port). InputError when it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(
            f"cannot resolve --host {host!r} ({exc.strerror})", "use an address such as 127.0.0.1"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            "pick another --port (e.g. --port 0 for any free one), or stop what uses it",
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(options: ServeOptions) -> None:
    """Serve until stopped (SIGTERM, Ctrl-C); returns normally."""
    import uvicorn

    from hetegen_cli.serve.app import create_app

    if not is_loopback(options.host) and not options.api_key:
        warn(
            f"serving on {options.host} without --api-key: anyone who can reach this machine can "
            "use the model; pass --api-key (or set HETEGEN_API_KEY)"
        )
    thread = ModelThread()  # plans, loads, generates and closes: one OpenMP team (serve.worker)
    try:
        setup = thread.submit(prepare_serving, options).result()  # every check, no weights yet
        sock = bind(options.host, options.port)
    except BaseException:
        thread.shutdown(wait=False)
        raise
    try:
        served = thread.submit(setup.load).result()
        try:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            base = f"http://{shown}:{port}/v1"
            app = create_app(served, options, thread)
            config = uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=max(1, round(options.grace_s)),
                lifespan="on",
            )
            server = _server_class()(config)
            _announce(server, base, served.model_id, served.describe())
            server.run(sockets=[sock])
        finally:
            thread.submit(served.close).result()
    finally:
        thread.shutdown(wait=False)
        sock.close()
    note("server stopped")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM / Ctrl-C end it cleanly (exit 0): uvicorn
        re-raises the signal after its graceful shutdown, which would kill the process."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if first:
                grace = self.config.timeout_graceful_shutdown or 0
                note(
                    f"{signal.Signals(sig).name}: stopping; requests in flight get up to {grace} s "
                    "(Ctrl-C again to stop now)"
                )
                # just before uvicorn would cancel the handlers, stop the generation instead:
                # the handler then answers 503 "shutting down" (in-band for a stream)
                worker = getattr(self.config.app.state, "worker", None)
                if worker is not None:
                    asyncio.get_running_loop().call_later(max(0.0, grace - 0.5), worker.cancel_all)

    return Server


def _announce(server: Any, base: str, model: str, info: dict) -> None:
    """Print the URL once uvicorn has started (its startup hook)."""
    original = server.startup

    async def startup(sockets=None) -> None:
        await original(sockets=sockets)
        if server.started:
            note(
                f"serving {model} ({info['engine']} on {info['device']}, {info['dtype']}, context "
                f"{info['context']} tokens) at {base}; Ctrl-C stops"
            )

    server.startup = startup
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
