"""
The TCP framer (also TLS and unix sockets): each frame is a 4-byte
big-endian length and the body, as C{Int32StringReceiver} reads them, with
less work per frame: this is the broker's innermost loop.
"""

from __future__ import annotations

import struct

from twisted.internet.protocol import Factory

from zaichik import codec
from zaichik.edge.connection import CLOSE_GRACE, BrokerConnection, _OutputProducer
from zaichik.service import BrokerService

__all__ = ["CLOSE_GRACE", "BrokerFactory", "BrokerProtocol", "_OutputProducer"]

_length = struct.Struct(">I")


class BrokerProtocol(BrokerConnection):
    """Length-prefixed frames over a stream (see L{BrokerConnection} for the policy)."""

    def dataReceived(self, data: bytes) -> None:
        """
        Split the stream into frames.  Messages published in one read reach
        each subscriber in one delivery per topic when the read is done.
        """
        joined = self.buffered(data)
        if joined is None:
            return
        data = joined
        end = len(data)
        at = 0
        limit = self.MAX_LENGTH
        unpack = _length.unpack_from
        handle = self.frameReceived
        with self.service.work:
            while end - at >= 4 and not self.paused:
                (length,) = unpack(data, at)
                if length > limit:
                    self._unprocessed = b""
                    self.frameTooLarge(length)
                    return
                start = at + 4
                at = start + length
                if at > end:
                    at = start - 4
                    break
                handle(data[start:at])
            # Before the batch ends: its delivery may release a hold, whose
            # dataReceived must find only the frames not yet handled.
            rest = data[at:] if at else data
            needed = 4 + unpack(rest, 0)[0] if len(rest) >= 4 and not self.paused else 0
            self.keep(rest, needed, at > 0)

    def writeFrames(self, data: bytes) -> None:
        self.transport.write(data)

    def sendFrame(self, body: bytes) -> None:
        self.transport.write(_length.pack(len(body)) + body)


class BrokerFactory(Factory):
    """Builds a L{BrokerProtocol} for each connection to one L{BrokerService}."""

    noisy = False

    def __init__(self, service: BrokerService, max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.service = service
        self.max_frame_size = max_frame_size
        self.clock = service.clock

    def buildProtocol(self, addr) -> BrokerProtocol:
        protocol = BrokerProtocol(self.service, self.max_frame_size)
        protocol.factory = self
        return protocol
