"""
zaichik: a small pub/sub message broker on Twisted.

The client library is L{zaichik.client}; the broker runs as C{twistd zaichik}.
"""

from zaichik.codec import ErrorCode, Start
from zaichik.errors import ZaichikError

__version__ = "0.1.0"

__all__ = ["ErrorCode", "Start", "ZaichikError", "__version__"]
