"""
The blocking client: ``from zaichik.sync import connect``.  It lives in
``zaichik/client/sync.py`` (see there); this module is its public name.  It
imports nothing from Twisted.
"""

from zaichik.client.sync import *  # noqa: F403
from zaichik.client.sync import __all__  # noqa: F401
