"""
WebSocket against a real broker (C{twistd zaichik}): C{wss://} from
C{--websocket-port ssl:...}, and C{--auth} over WebSocket (a good token, a
bad one, no HELLO), as over TCP.
"""

from __future__ import annotations

import os
import shutil
import ssl

from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.auth import hash_secret
from zaichik.codec import ErrorCode
from zaichik.testing import BrokerProcess, FreePort, WebSocketClient

from tests.test_auth import TLSFiles

_broker: list = []


def secure_broker():
    """One broker for the module: --auth, and a WebSocket listener with TLS."""
    if not _broker:
        files = TLSFiles()
        credentials = os.path.join(files.dir, "credentials")
        with open(credentials, "w") as f:
            f.write(f"writer {hash_secret('s3cret', n=2, r=1, p=1)} publish=ws/# subscribe=ws/# create=ws/#\n")
        wss = FreePort(f"ssl:{{port}}:privateKey={files.key}:certKey={files.cert}:interface=127.0.0.1")
        broker = BrokerProcess("--auth", credentials, "--websocket-port", wss)
        broker.start()
        port = wss.port
        import atexit

        atexit.register(broker.cleanup)
        atexit.register(shutil.rmtree, files.dir, True)
        _broker.extend([broker, port, files])
    return _broker


class SecureWebSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker, self.port, self.files = secure_broker()

    def connect(self) -> WebSocketClient:
        context = ssl.create_default_context(cafile=self.files.ca)
        client = WebSocketClient(self.port, host="localhost", ssl_context=context)
        self.addCleanup(client.close)
        return client

    def test_wss_with_a_token(self):
        c = self.connect()
        c.send(codec.Hello(1, "", "writer:s3cret"), codec.Subscribe(2, "ws/t", codec.Start.LATEST),
               codec.Publish(3, "ws/t", b"over wss"))
        replies = c.receive(4)
        self.assertEqual(replies[:3], [codec.Ok(1), codec.Ok(2), codec.Published(3, 0, False)])
        self.assertEqual((replies[3].topic, replies[3].value), ("ws/t", b"over wss"))

    def test_permissions_apply(self):
        c = self.connect()
        c.send(codec.Hello(1, "", "writer:s3cret"), codec.Publish(2, "elsewhere", b"x"))
        [ok, error] = c.receive(2)
        self.assertEqual(ok, codec.Ok(1))
        self.assertEqual((error.rid, ErrorCode(error.code)), (2, ErrorCode.NOT_AUTHORIZED))

    def test_bad_token_is_refused_and_closed(self):
        c = self.connect()
        c.send(codec.Hello(1, "", "writer:wrong"))
        [error] = c.receive(1)
        self.assertEqual((error.rid, ErrorCode(error.code)), (1, ErrorCode.NOT_AUTHORIZED))
        self.assertEqual(c.until_closed(), (1000).to_bytes(2, "big"))  # CLOSE 1000, then the end

    def test_no_hello_is_refused(self):
        c = self.connect()
        c.send(codec.Publish(1, "ws/t", b"x"))
        [error] = c.receive(1)
        self.assertEqual((error.rid, ErrorCode(error.code)), (1, ErrorCode.NOT_AUTHORIZED))
        self.assertEqual(c.until_closed(), (1000).to_bytes(2, "big"))  # CLOSE 1000, then the end
