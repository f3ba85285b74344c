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
import socket
import struct
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
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
        Check a HELLO's credentials, from C{peer} (its address, or for a unix
        socket its uid: L{peer_key}).

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
            from twisted.internet.threads import deferToThread

            run = deferToThread
        self._run: Callable[..., Deferred] = run
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


# -- who is asking ------------------------------------------------------------------

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_uid(transport) -> Optional[int]:
    """The uid of the process at the other end of a unix socket (Linux's C{SO_PEERCRED}), or None."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    # A TLS transport wraps the one with the socket.
    for _ in range(3):
        try:
            handle = transport.getHandle()
            _, uid, _ = _PEERCRED.unpack(handle.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size))
            return uid
        except (AttributeError, OSError, TypeError, ValueError, struct.error):
            transport = getattr(transport, "transport", None)
            if transport is None:
                return None
    return None


def peer_key(transport) -> str:
    """
    Who is asking, as the authentication limiter counts failures: the
    address of a TCP (or TLS) peer, and C{unix:uid=UID} for a peer on a
    unix socket, the user id of the process that connected (C{SO_PEERCRED},
    read when the connection is made).  Every unix client has the same
    (empty) address, so keyed by address one process could lock every local
    client out; keyed by uid, a misbehaving process locks out only its own
    user's processes (which could as well have made its attempts).  Unix
    peers are not exempt: a local user may not guess tokens any faster than
    a remote one.  Where C{SO_PEERCRED} is not available (not Linux), every
    unix client is C{unix}, one key.
    """
    address = transport.getPeer()
    if isinstance(address, UNIXAddress):
        uid = _peer_uid(transport)
        return "unix" if uid is None else f"unix:uid={uid}"
    return getattr(address, "host", None) or str(address)


# -- the authenticator ------------------------------------------------------------

MAX_TOKEN_LENGTH = 1024
TOO_MANY_FAILURES = "too many failed attempts; try later"


def default_concurrent_checks() -> int:
    """Half the CPUs, at least 2 and at most 8 (see L{PortalAuthenticator})."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


class _Check:
    """One HELLO's credentials, waiting to be checked."""

    __slots__ = ("client_id", "name", "secret", "deferred", "suspect")

    deferred: Deferred

    def __init__(self, client_id: str, name: str, secret: str, suspect: bool) -> None:
        self.client_id, self.name, self.secret, self.suspect = client_id, name, secret, suspect


class _Peer:
    """What the limiter knows of one peer (see L{peer_key})."""

    __slots__ = ("key", "failures", "waiting", "running", "ring")

    def __init__(self, key: str) -> None:
        self.key = key
        self.failures: List[float] = []  # when its recent checks failed
        self.waiting: Deque[_Check] = deque()
        self.running = 0
        self.ring: Optional[Deque["_Peer"]] = None  # the turn it waits in, if any


@implementer(IAuthenticator)
class PortalAuthenticator:
    """
    Authenticates HELLO tokens (C{NAME:SECRET}) through a C{twisted.cred}
    portal, limits failures per peer, and bounds the slow checks (scrypt)
    broker-wide.

    Failures: after C{max_failures} failed HELLOs (a bad token or a
    client_id the credential may not use) within C{window} seconds, a
    peer's HELLOs are refused unchecked, "too many failed attempts", until
    the window has passed.  Only failures count: a check in progress is not
    one, so a valid token is never refused because other checks, valid ones
    or not yet failed ones, are in flight.  A peer is an address, or the
    uid of a process on a unix socket (L{peer_key}).

    The work: at most C{max_concurrent_checks} checks run at once (by
    default half the CPUs, at least 2 and at most 8: each scrypt check
    takes 16 MiB and tens of milliseconds of a core, and the reactor's
    thread pool, 10 threads, also serves storage).  The others wait, in
    turns: each turn checks one HELLO of each waiting peer, peers with no
    recent failure first.  So a valid HELLO from such a peer waits for the
    checks already running and at most one check of each other clean peer
    (a spray from fresh addresses costs one check an address before it is
    suspect), never for the checks of peers that have failed.

    Waiting rather than refusing is the choice for checks beyond what runs:
    a peer's checks beyond its turn wait in its own queue, where they cost
    memory but no work, and once the peer reaches C{max_failures} they are
    all refused unchecked, so a peer gets at most C{max_failures +
    max_concurrent_checks - 1} guesses checked a window.  What waits is
    bounded: a peer with C{max_waiting_per_peer} HELLOs waiting (far more
    connections than one client host makes at once) is refused further
    ones, unchecked and not as failures, "too many authentication attempts
    waiting"; and HELLOs from peers with recent failures beyond
    C{max_suspect_waiting} waiting broker-wide are refused unchecked,
    "authentication is busy" (they would be checked only after every clean
    peer's anyway).  Neither refusal says "failed attempts".  A token
    longer than L{MAX_TOKEN_LENGTH} characters is a failure, unchecked.

    The L{Deferred} that L{authenticate} returns may be cancelled (the
    connection went away): a check still waiting is then dropped.

    Failure times are the clock's (wall-clock) seconds; a failure that
    seems to be in the future (the clock stepped back) is forgotten.
    """

    requires_hello = True

    def __init__(self, portal: Portal, clock=None, max_failures: int = 5, window: float = 60.0,
                 max_concurrent_checks: Optional[int] = None, max_waiting_per_peer: int = 100,
                 max_suspect_waiting: int = 64) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.portal = portal
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.max_concurrent_checks = (default_concurrent_checks() if max_concurrent_checks is None
                                      else max_concurrent_checks)
        self.max_waiting_per_peer = max_waiting_per_peer
        self.max_suspect_waiting = max_suspect_waiting
        if self.max_concurrent_checks < 1:
            raise ValueError("max_concurrent_checks must be at least 1")
        self._peers: Dict[str, _Peer] = {}
        self._clean: Deque[_Peer] = deque()  # peers with HELLOs waiting and no recent failure
        self._suspect: Deque[_Peer] = deque()  # peers with HELLOs waiting and recent failures
        self._suspect_waiting = 0  # HELLOs waiting that came from a peer with recent failures
        self._running = 0
        self._dispatching = False
        self._prune_at = 1024
        self._pruned = self.clock.seconds()

    @classmethod
    def from_file(cls, path: str, clock=None, run: Optional[Callable] = None, **limits) -> "PortalAuthenticator":
        credentials = load_credentials(path)
        portal = Portal(PermissionsRealm(credentials), [TokenFileChecker(credentials, run)])
        return cls(portal, clock, **limits)

    # -- peers

    def _peer(self, key: str) -> _Peer:
        peer = self._peers.get(key)
        if peer is None:
            # Peers whose failures have expired are forgotten now and then:
            # when there are twice as many as last time, or a window later.
            now = self.clock.seconds()
            if len(self._peers) >= self._prune_at or not 0 <= now - self._pruned < self.window:
                for old in list(self._peers.values()):
                    self._forget(old)
                self._prune_at = max(1024, 2 * len(self._peers))
                self._pruned = now
            peer = self._peers[key] = _Peer(key)
        return peer

    def _recent_failures(self, peer: _Peer) -> int:
        if peer.failures:
            now, window = self.clock.seconds(), self.window
            peer.failures = [t for t in peer.failures if 0 <= now - t < window]
        return len(peer.failures)

    def _forget(self, peer: _Peer) -> None:
        """Drop what is known of C{peer} if it no longer matters."""
        if (not peer.waiting and not peer.running and peer.ring is None and not self._recent_failures(peer)
                and self._peers.get(peer.key) is peer):
            del self._peers[peer.key]

    # -- HELLO

    def authenticate(self, client_id: str, token: str, peer: str):
        state = self._peer(peer)
        failures = self._recent_failures(state)
        if failures >= self.max_failures:
            return self._refuse(state, TOO_MANY_FAILURES, "too many failures")
        name, sep, secret = token.partition(":")
        if not sep or not name or len(token) > MAX_TOKEN_LENGTH:
            return self._failed(state, name[:64],
                                f"a token is NAME:SECRET (at most {MAX_TOKEN_LENGTH} characters)")
        if len(state.waiting) >= self.max_waiting_per_peer:
            return self._refuse(state, "too many authentication attempts waiting; try later",
                                f"{len(state.waiting)} waiting")
        suspect = failures > 0
        if suspect and self._suspect_waiting >= self.max_suspect_waiting:
            return self._refuse(state, "authentication is busy; try later",
                                f"{self._suspect_waiting} waiting from peers with recent failures")
        check = _Check(client_id, name, secret, suspect)
        check.deferred = Deferred(lambda d: self._cancel(state, check))
        state.waiting.append(check)
        if suspect:
            self._suspect_waiting += 1
        self._take_turn(state)
        self._dispatch()
        return check.deferred

    def _refuse(self, peer: _Peer, message: str, why: str):
        """Refuse a HELLO unchecked (not a failure)."""
        _log.warn("Authentication from {peer} refused unchecked: {why}", peer=peer.key, why=why)
        self._forget(peer)
        return fail(ZaichikError(ErrorCode.NOT_AUTHORIZED, message))

    def _failed(self, peer: _Peer, name: str, why: str):
        peer.failures.append(self.clock.seconds())
        _log.warn("Authentication failed for {name!r} from {peer}: {why}", name=name, peer=peer.key, why=why)
        if self._recent_failures(peer) >= self.max_failures:
            # Whatever it still has waiting is refused now, unchecked.
            waiting, peer.waiting = peer.waiting, deque()
            for check in waiting:
                self._unwait(check)
                check.deferred.errback(ZaichikError(ErrorCode.NOT_AUTHORIZED, TOO_MANY_FAILURES))
        elif peer.ring is self._clean:
            # No longer clean: its next turn comes after the clean peers'.
            self._clean.remove(peer)
            peer.ring = None
            self._take_turn(peer)
        return fail(ZaichikError(ErrorCode.NOT_AUTHORIZED, why))

    # -- the queue of checks

    def _take_turn(self, peer: _Peer) -> None:
        """Put C{peer}, if it has HELLOs waiting, at the end of its turn."""
        if peer.ring is None and peer.waiting:
            peer.ring = self._suspect if self._recent_failures(peer) else self._clean
            peer.ring.append(peer)

    def _unwait(self, check: _Check) -> None:
        if check.suspect:
            check.suspect = False
            self._suspect_waiting -= 1

    def _cancel(self, peer: _Peer, check: _Check) -> None:
        try:
            peer.waiting.remove(check)
        except ValueError:
            return  # running: let it finish
        self._unwait(check)

    def _dispatch(self) -> None:
        """Start waiting checks while fewer than C{max_concurrent_checks} run."""
        if self._dispatching:
            return  # (a check that finished at once, within the loop below)
        self._dispatching = True
        try:
            while self._running < self.max_concurrent_checks and (self._clean or self._suspect):
                peer = (self._clean or self._suspect).popleft()
                peer.ring = None
                if not peer.waiting:
                    self._forget(peer)
                    continue
                check = peer.waiting.popleft()
                self._unwait(check)
                self._take_turn(peer)  # its next HELLO waits for the others' turns
                self._check(peer, check)
        finally:
            self._dispatching = False

    def _check(self, peer: _Peer, check: _Check) -> None:
        self._running += 1
        peer.running += 1

        def done(result):
            self._running -= 1
            peer.running -= 1
            return result

        def logged_in(result):
            _, permissions, _ = result
            if not permissions.may_use_client_id(check.client_id):
                return self._failed(peer, check.name,
                                    f"credential {check.name} may not use client_id {check.client_id!r}")
            return permissions

        def refused(failure):
            failure.trap(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials)
            return self._failed(peer, check.name, "bad token")

        def answer(result):
            if not check.deferred.called:  # (else cancelled: nobody is waiting for it)
                if isinstance(result, Failure):
                    check.deferred.errback(result)
                else:
                    check.deferred.callback(result)
                result = None
            self._forget(peer)
            self._dispatch()
            if isinstance(result, Failure) and result.check(ZaichikError):
                return None
            return result  # (an unexpected error nobody heard of: logged as unhandled)

        d = self.portal.login(UsernamePassword(check.name.encode(), check.secret.encode()), None, IPermissions)
        d.addBoth(done).addCallbacks(logged_in, refused).addBoth(answer)


__all__ = [
    "ALLOW_ALL",
    "AllowAll",
    "IAuthenticator",
    "IPermissions",
    "Permissions",
    "PermissionsRealm",
    "PortalAuthenticator",
    "TokenFileChecker",
    "default_concurrent_checks",
    "hash_secret",
    "load_credentials",
    "new_token",
    "parse_credentials",
    "peer_key",
    "verify_secret",
]
