"""
Authentication and permissions.

The broker asks an L{IAuthenticator} about every HELLO; what it answers is a
L{Permissions} for the connection, which the session consults on every
request.  Two implementations:

  - L{AllowAll}: no credentials configured; HELLO is optional and everything
    is allowed.
  - L{PortalAuthenticator}: C{--auth FILE}.  Built on C{twisted.cred}: the
    HELLO token C{NAME:SECRET} becomes C{UsernamePassword} credentials, a
    L{TokenFileChecker} checks the secret against a salted scrypt hash (in a
    thread: scrypt is deliberately slow), and a L{PermissionsRealm} gives the
    credential's L{Permissions} as the avatar.  A deployment can plug in its
    own checker or realm through the same portal, or its own
    L{IAuthenticator}.

The credentials file has one credential a line; C{#} starts a comment::

    # name   token hash (zaichik hash-token)       permissions
    sensor1  scrypt$16384$8$1$<salt>$<hash>        publish=sensors/* client_id=sensor1
    reader   scrypt$16384$8$1$<salt>$<hash>        subscribe=sensors/*,alerts/# create=#
    admin    scrypt$16384$8$1$<salt>$<hash>        publish=# subscribe=# create=# client_id=*

Permission patterns (comma-separated): C{#} alone matches every topic,
C{prefix/#} the topic C{prefix} and everything below it, C{*} any run of
characters except C{/}; anything else matches itself.  A credential without a
C{client_id=} entry may use only the empty client_id (no durable position):
binding client ids to credentials is what stops one client from taking over
another's durable position.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import fail
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError

_log = Logger()


# -- permissions ------------------------------------------------------------------


def _pattern(text: str) -> "re.Pattern[str]":
    if text == "#":
        return re.compile(r".*\Z", re.S)
    if text.endswith("/#"):
        base = re.escape(text[:-2])
        return re.compile(base + r"(/.*)?\Z", re.S)
    return re.compile("[^/]*".join(re.escape(part) for part in text.split("*")) + r"\Z")


class Patterns:
    """A list of topic (or client id) patterns; see the module docstring."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.texts = [t for t in texts if t]
        self._compiled = [_pattern(t) for t in self.texts]

    def __repr__(self) -> str:
        return f"Patterns({self.texts!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Patterns) and self.texts == other.texts

    def match(self, name: str) -> bool:
        return any(p.match(name) for p in self._compiled)


class Permissions:
    """What one credential may do."""

    def __init__(self, publish: Iterable[str] = (), subscribe: Iterable[str] = (),
                 create: Iterable[str] = (), client_ids: Iterable[str] = ()) -> None:
        self.publish = Patterns(publish)
        self.subscribe = Patterns(subscribe)
        self.create = Patterns(create)
        self.client_ids = Patterns(client_ids)

    def __repr__(self) -> str:
        return (f"Permissions(publish={self.publish.texts}, subscribe={self.subscribe.texts}, "
                f"create={self.create.texts}, client_ids={self.client_ids.texts})")

    def may_publish(self, topic: str) -> bool:
        return self.publish.match(topic)

    def may_subscribe(self, topic: str) -> bool:
        return self.subscribe.match(topic)

    def may_create(self, topic: str) -> bool:
        return self.create.match(topic)

    def may_use_client_id(self, client_id: str) -> bool:
        return not client_id or self.client_ids.match(client_id)


ALLOW_ALL = Permissions(["#"], ["#"], ["#"], ["*"])


# -- the seam ---------------------------------------------------------------------


class IAuthenticator(Interface):
    requires_hello = Attribute(
        "True if a connection must authenticate with HELLO before any other request.")

    def authenticate(client_id: str, token: str, peer: str) -> object:
        """
        Check a HELLO's credentials, from the peer address C{peer}.

        @return: the connection's L{Permissions} (or a Deferred firing with
            them).
        @raise zaichik.errors.ZaichikError: with C{NOT_AUTHORIZED} (raised,
            or as the Deferred's failure) to refuse the connection.
        """


@implementer(IAuthenticator)
class AllowAll:
    """No credentials configured: HELLO is optional and everything is allowed."""

    requires_hello = False

    def authenticate(self, client_id: str, token: str, peer: str) -> object:
        return ALLOW_ALL


# -- tokens and the credentials file -------------------------------------------------

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str, salt: Optional[bytes] = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
                p: int = SCRYPT_P) -> str:
    """A salted scrypt hash of C{secret}, as stored in the credentials file."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Does C{secret} match the C{stored} hash?  (Constant-time comparison.)"""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                                  dklen=len(_unb64(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed, _unb64(digest))


def new_token(name: str) -> Tuple[str, str]:
    """A fresh C{NAME:SECRET} token and the hash to store for it."""
    secret = secrets.token_urlsafe(24)
    return f"{name}:{secret}", hash_secret(secret)


class CredentialsFileError(ValueError):
    pass


def parse_credentials(text: str) -> Dict[str, Tuple[str, Permissions]]:
    """C{{name: (hash, permissions)}} from the credentials file's text."""
    keys = {"publish": "publish", "subscribe": "subscribe", "create": "create", "client_id": "client_ids"}
    credentials: Dict[str, Tuple[str, Permissions]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        # '#' is also a pattern, so a comment is a whole line, or " # ..." at the end.
        line = line.strip().split(" # ", 1)[0]
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise CredentialsFileError(f"line {number}: expected NAME HASH [PERMISSION=PATTERNS ...]")
        name, stored, *grants = fields
        if ":" in name:
            raise CredentialsFileError(f"line {number}: a name cannot contain ':'")
        if not stored.startswith("scrypt$"):
            raise CredentialsFileError(f"line {number}: the hash must come from 'zaichik hash-token'")
        lists: Dict[str, List[str]] = {v: [] for v in keys.values()}
        for grant in grants:
            key, sep, patterns = grant.partition("=")
            if not sep or key not in keys:
                raise CredentialsFileError(
                    f"line {number}: unknown permission {grant!r} (publish=, subscribe=, create=, client_id=)")
            lists[keys[key]].extend(p for p in patterns.split(",") if p)
        if name in credentials:
            raise CredentialsFileError(f"line {number}: {name} is defined twice")
        credentials[name] = (stored, Permissions(**lists))
    return credentials


def load_credentials(path: str) -> Dict[str, Tuple[str, Permissions]]:
    with open(path, encoding="utf-8") as f:
        return parse_credentials(f.read())


# -- twisted.cred pieces ------------------------------------------------------------


@implementer(ICredentialsChecker)
class TokenFileChecker:
    """
    Checks C{UsernamePassword} credentials against the hashes of a
    credentials file.  C{run} runs the (slow, CPU-bound) scrypt check off
    the reactor thread: by default C{twisted.internet.threads.deferToThread}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, credentials: Dict[str, Tuple[str, Permissions]], run: Optional[Callable] = None) -> None:
        self.credentials = credentials
        if run is None:
            from twisted.internet.threads import deferToThread as run
        self._run = run
        # Unknown names are checked against a dummy hash so that they take
        # as long as known ones (no name enumeration by timing).
        self._dummy = hash_secret(secrets.token_urlsafe(8))

    def requestAvatarId(self, credentials):
        name = credentials.username.decode() if isinstance(credentials.username, bytes) else credentials.username
        secret = credentials.password.decode() if isinstance(credentials.password, bytes) else credentials.password
        stored = self.credentials.get(name, (self._dummy, None))[0]
        known = name in self.credentials

        def checked(ok: bool):
            if ok and known:
                return name
            raise cred_error.UnauthorizedLogin()

        return self._run(verify_secret, secret, stored).addCallback(checked)


class IPermissions(Interface):
    """The avatar interface: a connection's L{Permissions}."""


@implementer(IRealm)
class PermissionsRealm:
    def __init__(self, credentials: Dict[str, Tuple[str, Permissions]]) -> None:
        self.credentials = credentials

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IPermissions not in interfaces:
            raise NotImplementedError("only IPermissions avatars")
        return IPermissions, self.credentials[avatarId][1], lambda: None


@implementer(IAuthenticator)
class PortalAuthenticator:
    """
    Authenticates HELLO tokens (C{NAME:SECRET}) through a C{twisted.cred}
    portal, and rate-limits failures per peer address: after C{max_failures}
    failures within C{window} seconds, a peer's HELLOs are refused unchecked
    until the window has passed.
    """

    requires_hello = True

    def __init__(self, portal: Portal, clock=None, max_failures: int = 5, window: float = 60.0) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: Dict[str, List[float]] = {}
        self._checking: Dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str, clock=None, run: Optional[Callable] = None) -> "PortalAuthenticator":
        credentials = load_credentials(path)
        portal = Portal(PermissionsRealm(credentials), [TokenFileChecker(credentials, run)])
        return cls(portal, clock)

    def _recent_failures(self, peer: str) -> List[float]:
        now = self.clock.seconds()
        recent = [t for t in self._failures.get(peer, ()) if now - t < self.window]
        if recent:
            self._failures[peer] = recent
        else:
            self._failures.pop(peer, None)
        return recent

    def authenticate(self, client_id: str, token: str, peer: str):
        # Checks still running count as failures until they succeed, so one
        # peer cannot queue more than max_failures slow scrypt checks.
        if len(self._recent_failures(peer)) + self._checking.get(peer, 0) >= self.max_failures:
            _log.warn("Authentication from {peer} refused unchecked: too many failures", peer=peer)
            return fail(ZaichikError(ErrorCode.NOT_AUTHORIZED, "too many failed attempts; try later"))
        name, sep, secret = token.partition(":")
        if not sep or not name:
            return self._failed(peer, name, "a token is NAME:SECRET")
        self._checking[peer] = self._checking.get(peer, 0) + 1

        def checked(result):
            left = self._checking[peer] - 1
            if left:
                self._checking[peer] = left
            else:
                del self._checking[peer]
            return result

        d = self.portal.login(UsernamePassword(name.encode(), secret.encode()), None, IPermissions)
        d.addBoth(checked)

        def logged_in(result):
            _, permissions, _ = result
            if not permissions.may_use_client_id(client_id):
                return self._failed(peer, name, f"credential {name} may not use client_id {client_id!r}")
            return permissions

        def refused(failure):
            failure.trap(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials)
            return self._failed(peer, name, "bad token")

        return d.addCallbacks(logged_in, refused)

    def _failed(self, peer: str, name: str, why: str):
        self._failures.setdefault(peer, []).append(self.clock.seconds())
        _log.warn("Authentication failed for {name!r} from {peer}: {why}", name=name, peer=peer, why=why)
        return fail(ZaichikError(ErrorCode.NOT_AUTHORIZED, why))


__all__ = [
    "ALLOW_ALL",
    "AllowAll",
    "IAuthenticator",
    "IPermissions",
    "Permissions",
    "PermissionsRealm",
    "PortalAuthenticator",
    "TokenFileChecker",
    "hash_secret",
    "load_credentials",
    "new_token",
    "parse_credentials",
    "verify_secret",
]
