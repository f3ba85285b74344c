"""
Reading what a broker sent before a connection failed on a write.

A broker that refuses a frame (FRAME_TOO_LARGE) sends its ERROR and closes
while the client may still be writing the frame; the client's next write
fails (EPIPE, ECONNRESET), and an event loop then reports the connection
lost without reading what is still in the socket's receive buffer: the
ERROR that says why.  The adapters read it here, from a duplicate of the
socket, before they pass the loss on.
"""

from __future__ import annotations

import socket
from typing import Any


def read_what_is_left(sock: Any, limit: int = 1 << 20) -> bytes:
    """The bytes waiting in C{sock}'s receive buffer (at most C{limit}), or b""."""
    try:
        copy = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
    except (OSError, ValueError, AttributeError):
        return b""
    chunks = []
    size = 0
    try:
        copy.setblocking(False)
        while size < limit:
            try:
                chunk = copy.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        copy.close()
    return b"".join(chunks)
