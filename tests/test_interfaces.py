"""
Every implementation of one of the project's seams provides its interface
fully (zope.interface.verify: methods with compatible signatures and the
attributes the interface names), on live objects.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from zaichik.auth import AllowAll, IAuthenticator, PermissionsRealm, PortalAuthenticator, TokenFileChecker
from zaichik.protocol import BrokerFactory, _OutputProducer
from zaichik.service import BrokerService
from zaichik.storage import IMessageLog, IStorage
from zaichik.storage.disk import DiskStorage
from zaichik.storage.memory import MemoryStorage
from zaichik.subscription import Output, Subscription
from zaichik.topic import ISubscriber


class InterfaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def test_memory_storage_and_its_logs(self):
        storage = MemoryStorage(self.clock)
        self.assertTrue(verifyObject(IStorage, storage))
        self.assertTrue(verifyObject(IMessageLog, storage.open_log("t", 1000, 0)))

    def test_disk_storage_and_its_logs(self):
        directory = tempfile.mkdtemp(prefix="zaichik-iface-")
        self.addCleanup(shutil.rmtree, directory, True)
        storage = DiskStorage(directory, clock=self.clock, run_blocking=maybeDeferred)
        self.successResultOf(storage.open())
        self.addCleanup(storage.close)
        self.assertTrue(verifyObject(IStorage, storage))
        self.assertTrue(verifyObject(IMessageLog, storage.open_log("t", 1000, 0)))

    def test_subscription(self):
        service = BrokerService(clock=self.clock)
        topic = service.create_topic("t", 0, 0)
        self.assertTrue(verifyObject(ISubscriber, Subscription(topic, Output(lambda data: None))))

    def test_authenticators_checker_and_realm(self):
        self.assertTrue(verifyObject(IAuthenticator, AllowAll()))
        checker = TokenFileChecker({})
        realm = PermissionsRealm({})
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertTrue(verifyObject(IRealm, realm))
        self.assertTrue(verifyObject(IAuthenticator, PortalAuthenticator(Portal(realm, [checker]), self.clock)))

    def test_output_producer(self):
        factory = BrokerFactory(BrokerService(clock=self.clock))
        protocol = factory.buildProtocol(None)
        self.assertTrue(verifyObject(IPushProducer, _OutputProducer(protocol)))
