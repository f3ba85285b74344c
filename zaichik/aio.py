"""
The asyncio client: ``from zaichik.aio import connect``.  It lives in
``zaichik/client/aio.py`` (see there); this module is its public name.  It
imports nothing from Twisted and runs under uvloop too.
"""

from zaichik.client.aio import *  # noqa: F403
from zaichik.client.aio import __all__  # noqa: F401
