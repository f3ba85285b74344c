"""
The authentication seam: who may connect with a HELLO token.

The broker asks an L{IAuthenticator} about every HELLO.  The default,
L{AllowAll}, accepts any token: it is what a broker without credentials
configured does.
"""

from __future__ import annotations

from zope.interface import Interface, implementer


class IAuthenticator(Interface):
    def authenticate(client_id: str, token: str) -> object:
        """
        Check a HELLO's credentials.

        @return: an identity for the connection (or a Deferred firing with
            one).
        @raise zaichik.errors.ZaichikError: with C{NOT_AUTHORIZED} (raised,
            or as the Deferred's failure) to refuse the connection.
        """


@implementer(IAuthenticator)
class AllowAll:
    """Accepts every token."""

    def authenticate(self, client_id: str, token: str) -> object:
        return client_id
