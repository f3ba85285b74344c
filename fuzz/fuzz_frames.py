"""
Coverage-guided fuzzing (atheris) of the frame decoder and the broker's
protocol.

    pip install atheris
    python fuzz/fuzz_frames.py -max_total_time=60        # CI runs it for a bounded time

For each input:
  - decode_request and decode_reply either return a frame or raise
    DecodeError, nothing else; a decoded frame encodes back to the same bytes
    (the encoding is canonical);
  - the input as a byte stream fed to a BrokerProtocol (over a
    StringTransport) raises nothing and makes the broker log no failure.
"""

import os
import sys

import atheris

with atheris.instrument_imports():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zaichik import codec
    from zaichik.protocol import BrokerFactory
    from zaichik.service import BrokerService

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

failures = []
globalLogPublisher.addObserver(lambda event: failures.append(event) if event.get("log_failure") else None)

clock = Clock()
service = BrokerService(clock=clock)
factory = BrokerFactory(service, max_frame_size=4096)


def check_decoder(data: bytes, decode) -> None:
    try:
        frame = decode(data)
    except codec.DecodeError:
        return
    again = frame.encode()
    if again != data:
        raise AssertionError(f"{data!r} decodes to {frame!r}, which encodes to {again!r}")


def TestOneInput(data: bytes) -> None:
    check_decoder(data, codec.decode_request)
    check_decoder(data, codec.decode_reply)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    # Split in two reads at a point taken from the input itself.
    cut = data[0] % (len(data) + 1) if data else 0
    protocol.dataReceived(data[:cut])
    protocol.dataReceived(data[cut:])
    protocol.connectionLost(None)
    clock.advance(60)
    if failures:
        raise AssertionError(f"the broker logged a failure: {failures[0]}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
