"""
The baseline: a bare Twisted forwarder speaking just enough of the protocol.

Each connection is an Int32StringReceiver.  SUBSCRIBE adds the connection to
the topic's subscribers and answers OK; PUBLISH (rid 0) is parsed for its
topic and its body handed to every subscriber of that topic with
sendString.  Nothing else: no offsets, no storage, no flow control.  This is
what "Twisted at its plainest" delivers on this machine, the yardstick for
zaichik's figures.

    python benchmarks/baseline.py PORT
"""

import struct
import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import Int32StringReceiver

_u16 = struct.Struct(">H")
_ok = struct.Struct(">BI")


class Forwarder(Int32StringReceiver):
    MAX_LENGTH = 16 * 1024 * 1024

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.topics = []

    def stringReceived(self, body):
        op = body[0]
        (n,) = _u16.unpack_from(body, 5)
        topic = body[7 : 7 + n]
        if op == 0x05:
            for subscriber in self.factory.subscribers.get(topic, ()):
                subscriber.sendString(body)
        elif op == 0x03:
            self.factory.subscribers.setdefault(topic, []).append(self)
            self.topics.append(topic)
            self.sendString(_ok.pack(0x80, _ok.unpack_from(body)[1]))

    def connectionLost(self, reason):
        for topic in self.topics:
            self.factory.subscribers[topic].remove(self)


class ForwarderFactory(protocol.Factory):
    protocol = Forwarder
    noisy = False

    def __init__(self):
        self.subscribers = {}


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[1]), ForwarderFactory(), interface="127.0.0.1")
    reactor.run()
