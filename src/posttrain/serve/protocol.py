"""The HTTP connection guard of ``posttrain serve``: a header-read timeout uvicorn does not have.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps connections (``limit_concurrency``),
but it waits for a request's headers forever: a client that sends one header line a second ("slowloris") holds a
connection, and enough of them hold them all. :func:`guarded_h11` is uvicorn's h11 protocol with one timer added:
armed when a connection opens and whenever it goes back to waiting for a request, disarmed once a request's
headers are complete; when it fires, the connection is closed.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, closing connections that take over ``header_timeout_s`` to send headers."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %.0f s",
                                 header_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection is done)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # waiting for the next request on this connection
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
