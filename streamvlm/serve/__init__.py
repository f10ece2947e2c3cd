"""`streamvlm serve`: the HTTP API and web page (see streamvlm.serve.app)."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import sys

from streamvlm.serve.app import ServeConfig, create_app
from streamvlm.serve.engine import Engine
from streamvlm.serve.media import MediaPolicy

__all__ = ["Engine", "MediaPolicy", "ServeConfig", "create_app", "listen_socket", "serve"]

log = logging.getLogger(__name__)


def serve(engine: Engine, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning") -> None:
    """Run the server until interrupted. port 0 takes a free port; the first line on stdout says which."""
    import uvicorn

    if config.api_key is None and not _is_loopback(host):
        print(f"warning: serving on {host} without an API key: anyone who can reach this machine can use the "
              "model and open streams; pass --api-key KEY (or set STREAMVLM_API_KEY)", file=sys.stderr)
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"streamvlm serve: listening on http://{shown}:{port} (model {engine.model_id!r}, routing "
          f"{engine.default_routing}, {engine.workers} worker(s), batches of up to {engine.max_batch}); web page at /, "
          "API description at /docs",
          flush=True)
    _fixed_mmap_threshold()
    app = create_app(engine, config)
    uconfig = uvicorn.Config(app, log_level=log_level, ws="websockets-sansio", lifespan="on",
                             timeout_graceful_shutdown=5, http=_protocol(config.header_timeout_s, config.max_connections),
                             timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
                             h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = uvicorn.Server(uconfig)
    server.run(sockets=[sock])


MAX_HEADER_BYTES = 16 * 1024
"""Largest request line and headers (h11's own default, stated): more is a 400."""


def _protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol with what it lacks: a deadline for a request's headers (uvicorn's keep-alive
    timer starts only after a first response, and data cancels it, so a client sending a byte now and then
    held its connection for ever), and a hard cap on open connections (uvicorn's limit_concurrency is only
    checked once a whole request has arrived, and never for WebSocket upgrades)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
                                b"connection: close\r\ncontent-length: 22\r\n\r\ntoo many connections\r\n")
                transport.close()
                return
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            waiting_after = self.cycle  # a new request replaces the cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late, waiting_after)

        def _headers_late(self, waiting_after) -> None:
            # still no new request, and the connection was not handed to the WebSocket protocol
            if self.cycle is waiting_after and self.transport.get_protocol() is self and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one). Connections wait in its backlog until uvicorn accepts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # No Nagle: an answer is many small writes (a WebSocket message or an SSE chunk per token), and Nagle
    # holds each behind the ACK of the last, which the client delays by up to 40 ms (measured: time to first
    # token over the WebSocket 44 ms with it, 6 ms without). Accepted connections inherit it on Linux.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _fixed_mmap_threshold(threshold: int = 128 * 1024) -> None:
    """Have glibc serve every allocation over 128 KiB with its own mmap, returned to the system on free.

    By default glibc raises that threshold each time such a block is freed, after which decoded frames and
    activations (hundreds of KiB to MiB) come from the per-thread heaps, which do not shrink: a server that
    opens and closes live sessions, each with threads of its own, then grows by several MiB a session
    (measured: +27 MiB over three rounds of three 640x480 sessions; with the fixed threshold +2 MiB)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    # the trim threshold too: glibc raised it along with the mmap threshold, and it decides when free
    # memory at the top of a heap goes back to the system
    if not (libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, 2 * threshold)):
        log.warning("could not set malloc's mmap threshold; memory may grow as sessions come and go")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
