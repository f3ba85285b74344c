"""
The broker's TCP edge, kept importable under its first name: it now lives in
L{zaichik.edge}.
"""

from zaichik.edge.tcp import CLOSE_GRACE, BrokerFactory, BrokerProtocol, _OutputProducer

__all__ = ["CLOSE_GRACE", "BrokerFactory", "BrokerProtocol", "_OutputProducer"]
