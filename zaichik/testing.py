"""
Helpers for testing against a real broker: C{twistd zaichik} in a
subprocess on a free loopback port.  Used by zaichik's own end-to-end tests
and benchmarks; usable by applications' tests too.
"""

from __future__ import annotations

import atexit
import base64
import errno
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar, Union

from zaichik import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def parse_frames(data: bytes) -> list:
    """
    Decode a byte string of whole broker-to-client frames (replies and
    messages).  Raises ValueError if it does not end on a frame boundary.
    """
    frames = []
    at = 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "big")
        body = data[at + 4 : at + 4 + n]
        if len(data) - at < 4 or len(body) != n:
            raise ValueError(f"truncated frame at byte {at}")
        frames.append(codec.decode_reply(body))
        at += 4 + n
    return frames


def free_port() -> int:
    """
    A loopback port no socket uses now.  Nothing holds it: until a process
    listens on it, another listener, or the local end of a connection, may
    take it.  A process started on it should be started with
    L{retry_in_use} (L{BrokerProcess} and L{RedisServer} are).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How twistd zaichik, Twisted, redis-server (and most programs) say that a
# port is taken: strerror(EADDRINUSE).
IN_USE = os.strerror(errno.EADDRINUSE)

PORT_TRIES = 5  # starts on fresh ports, at most, when a free_port() was taken
KEPT_PORT_WAIT = 5.0  # seconds a port that must be kept (a restart) is tried again while taken

_T = TypeVar("_T")


class PortInUse(RuntimeError):
    """
    A process could not listen: its port was in use.  C{renewable}: the
    port was a free_port() that starting again replaces with another (else
    it must be kept: a restart on the port clients reconnect to).
    """

    def __init__(self, message: str, renewable: bool) -> None:
        super().__init__(message)
        self.renewable = renewable


def retry_in_use(start: Callable[[], _T], tries: int = PORT_TRIES, wait: float = KEPT_PORT_WAIT) -> _T:
    """
    C{start()}, called again while it raises L{PortInUse}: at once when the
    error is renewable (C{start} chooses another port), up to C{tries} starts
    in all; after a pause when it is not (a kept port may be freed soon:
    the local end of a short connection), for up to C{wait} seconds.  Then
    the last L{PortInUse} is raised.
    """
    starts = 0
    deadline: Optional[float] = None
    while True:
        try:
            return start()
        except PortInUse as e:
            starts += 1
            if e.renewable:
                if starts >= tries:
                    raise
            else:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + wait
                if now >= deadline:
                    raise
                time.sleep(0.2)


def port_taken(port: int) -> bool:
    """
    Whether a listener that sets SO_REUSEADDR (Twisted's, redis-server's)
    could not bind 127.0.0.1:C{port} now: another listener, or a socket
    bound without SO_REUSEADDR (a connection's local end), holds it.  For a
    process that exited before it listened: was its port taken?
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False


def start_on_free_port(start: Callable[[int], subprocess.Popen], name: str,
                       timeout: float = 10.0) -> Tuple[subprocess.Popen, int]:
    """
    A server process, C{start(port)}, on a L{free_port}: returned with its
    port once the port accepts a connection.  Started again on another port
    if it exits with its port taken (L{retry_in_use}).
    """

    def attempt() -> Tuple[subprocess.Popen, int]:
        port = free_port()
        process = start(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if port_taken(port):
                    raise PortInUse(f"{name} could not listen on {port}: taken", renewable=True)
                raise RuntimeError(f"{name} exited with {process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return process, port
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait()
        raise RuntimeError(f"{name} did not listen within {timeout} s")

    return retry_in_use(attempt)


class FreePort:
    """
    An endpoint description on a port chosen when a L{BrokerProcess}
    starts: C{template} with C{{port}} replaced by the port, e.g.
    C{FreePort("ssl:{port}:privateKey=k:certKey=c:interface=127.0.0.1")}
    as the value of a C{--port} or C{--websocket-port} option.  The port is
    a L{free_port}, chosen again if the broker's first start finds it taken,
    then kept (across L{BrokerProcess.restart}); read it as C{port} once the
    broker has started.
    """

    def __init__(self, template: str = "{port}", port: int = 0) -> None:
        self.template = template
        self.port = port
        self.kept = False  # a broker has listened on it: never chosen again

    def __str__(self) -> str:
        return self.template.replace("{port}", str(self.port))

    def __repr__(self) -> str:
        return f"FreePort({str(self)!r})"


# An option of a BrokerProcess: a string; a FreePort; or a function giving
# the string when the broker starts (e.g. a URL naming a FreePort's port).
Option = Union[str, FreePort, Callable[[], str]]
LOOPBACK = "tcp:{port}:interface=127.0.0.1"


def _taken_ports(log: str) -> List[int]:
    """
    The ports twistd zaichik said were in use: its one line is "cannot
    listen on --port DESCRIPTION: Address already in use", the description
    as given or completed (a bare port as tcp:PORT:interface=127.0.0.1).
    """
    ports = []
    for line in log.splitlines():
        said, found, _ = line.partition(f": {IN_USE}")
        if found and "cannot listen on " in said:
            description = said.split("cannot listen on ", 1)[1].split(" ", 1)[-1]
            ports += [int(field) for field in description.split(":") if field.isdigit()]
    return ports


class BrokerProcess:
    """
    C{twistd -n zaichik} in a subprocess, listening on 127.0.0.1:C{port}.

    The directory holding this C{zaichik} package goes first on
    C{PYTHONPATH}, so the broker is the same code as the caller's (its plugin
    is found in C{twisted/plugins/} beside it, in a checkout or an install).

    Its ports are L{free_port}s: if one is taken before the broker listens
    on it (by another listener, or a connection's local end), the first
    start chooses another and starts again; a restart keeps its ports (the
    clients reconnect to them) and waits a little for a taken one.
    """

    def __init__(self, *options: Option, twistd_options: Sequence[str] = (), websocket: bool = False,
                 http: bool = False, listen: str = LOOPBACK) -> None:
        """
        @param options: after "zaichik": strings, L{FreePort}s (e.g. the
            value of another C{--port}), or functions giving a string at
            each start.
        @param twistd_options: before "zaichik": e.g. C{["-r", "asyncio"]}.
        @param websocket: listen for WebSocket clients too, on
            C{websocket_port} (kept across L{restart}).
        @param http: serve /metrics, the console and zaichik.js on
            C{http_port} (kept across L{restart}).  Both are chosen now, and
            again if the first start finds one taken: an option naming one
            is a function, read at the start.
        @param listen: the C{--port} description, C{{port}} for the port
            (which must take a PING on 127.0.0.1): e.g. C{"{port}"}, a bare port.
        """
        self.options: List[Option] = list(options)
        self.twistd_options = list(twistd_options)  # before "zaichik": e.g. ["-r", "asyncio"]
        self.process: Optional[subprocess.Popen] = None
        self.log_path = ""
        self._discard_log = False  # log_path is a start that found its port taken
        self._listener = FreePort(listen)
        # Chosen now (they may be read before the start), chosen again if taken.
        self._websocket = FreePort(LOOPBACK, free_port()) if websocket else None
        self._http = FreePort(LOOPBACK, free_port()) if http else None

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def websocket_port(self) -> int:
        return self._websocket.port if self._websocket else 0

    @property
    def http_port(self) -> int:
        return self._http.port if self._http else 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ports(self) -> List[FreePort]:
        return [p for p in [self._listener, self._websocket, self._http, *self.options] if isinstance(p, FreePort)]

    def start(self, timeout: float = 15.0, port: int = 0) -> "BrokerProcess":
        """
        Start the broker; return once it answers a PING (within C{timeout}
        seconds).  It listens on C{port} (kept: waited for if taken), or on a
        free port.
        """
        self._listener.port, self._listener.kept = port, bool(port)
        retry_in_use(lambda: self._start(timeout))
        for p in self._ports():
            p.kept = True
        return self

    def _start(self, timeout: float) -> None:
        if self._discard_log:
            os.unlink(self.log_path)
            self.log_path, self._discard_log = "", False
        ports = self._ports()
        for p in ports:
            p.port = p.port or free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        if self.log_path:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)  # (a restart: one log, each start after the last)
        else:
            fd, self.log_path = tempfile.mkstemp(prefix="zaichik-broker-", suffix=".log")
        argv: List[str] = TWISTD + self.twistd_options + ["-n", "--pidfile=", "zaichik",
                                                            "--port", str(self._listener)]
        argv += [o() if callable(o) else str(o) for o in self.options]
        if self._websocket:
            argv += ["--websocket-port", str(self._websocket)]
        if self._http:
            argv += ["--metrics-port", str(self._http)]
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fd, stderr=subprocess.STDOUT)
        os.close(fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log()
                taken = [p for p in ports if p.port in _taken_ports(log)]
                if taken:
                    error = PortInUse(f"broker could not listen, port taken: {', '.join(map(str, taken))}:\n{log}",
                                      renewable=not any(p.kept for p in taken))
                    self._discard_log = True
                    for p in taken:
                        if not p.kept:
                            p.port = 0  # another at the next start
                    raise error
                raise RuntimeError(f"broker exited with {self.process.returncode}:\n{log}")
            if self._answers_ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not listen within {timeout} s:\n{self.log()}")

    def _answers_ping(self) -> bool:
        """
        Ready means the reactor runs (a listening port alone is not: twistd
        listens before it installs its signal handlers).
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(codec.frame(codec.Ping(1).encode()))
                answer = b""
                while len(answer) < 4 or len(answer) < 4 + int.from_bytes(answer[:4], "big"):
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    answer += chunk
                # OK, or NOT_AUTHORIZED from a broker with --auth: either way it runs.
                return getattr(codec.decode_reply(answer[4:]), "rid", None) == 1
        except OSError:
            return False

    def restart(self, timeout: float = 15.0) -> "BrokerProcess":
        """Stop and start again on the same ports."""
        self.stop()
        return self.start(timeout, self.port)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit code (killing it if it hangs)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def cleanup(self) -> None:
        self.stop()
        if self.log_path and os.path.exists(self.log_path):
            os.unlink(self.log_path)


_shared: dict = {}


def shared_broker(*options: str) -> BrokerProcess:
    """
    One broker per set of options for the whole process, started on first
    use and stopped at exit.  (Trial has no C{setUpClass}; this works the same
    under trial and pytest.)
    """
    broker = _shared.get(options)
    if broker is None or broker.process is None or broker.process.poll() is not None:
        broker = _shared[options] = BrokerProcess(*options).start()
        atexit.register(broker.cleanup)
    return broker


class WebSocketClient:
    """
    A blocking WebSocket client for tests and benchmarks: the handshake
    (subprotocol C{zaichik.v1}), masked binary messages out, and the
    server's messages parsed back into frame bodies.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", origin: Optional[str] = None,
                 timeout: float = 10.0, path: str = "/", protocol: Optional[str] = "zaichik.v1",
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        """C{ssl_context}: C{wss://}, the certificate checked for C{host}."""
        from zaichik.edge.websocket import accept_key

        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock if ssl_context is None else ssl_context.wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if protocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during the handshake: {head!r}")
            head += chunk
        head, _, self.buffer = head.partition(b"\r\n\r\n")
        self.status = head.split(b"\r\n")[0].decode("latin-1")
        if " 101 " not in self.status + " " or accept_key(key).encode("ascii") not in head:
            raise ConnectionError(f"handshake refused: {head.decode('latin-1')}")
        self.mask = os.urandom(4)
        self.closed_with: Optional[bytes] = None  # the payload of the broker's CLOSE frame

    def encode(self, *requests, opcode: int = 2) -> bytes:
        """C{requests} (codec objects or frame bodies) as masked messages (binary unless told)."""
        from zaichik.edge.websocket import encode_frame

        return b"".join(encode_frame(opcode, r if isinstance(r, bytes) else r.encode(), self.mask)
                        for r in requests)

    def send(self, *requests) -> None:
        self.sock.sendall(self.encode(*requests))

    def messages(self) -> list:
        """C{(opcode, payload)} of the whole messages that have arrived (waiting for at least one)."""
        from zaichik.edge.websocket import parse_messages

        while True:
            messages, used = parse_messages(self.buffer)
            if messages:
                self.buffer = self.buffer[used:]
                for opcode, payload in messages:
                    if opcode == 8:  # CLOSE
                        self.closed_with = payload
                return messages
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def receive(self, count: int = 1) -> list:
        """The next C{count} or more of the broker's frames, decoded (waiting for them)."""
        out: list = []
        while len(out) < count:
            out += [codec.decode_reply(payload) for opcode, payload in self.messages() if opcode == 2]
        return out

    def until_closed(self) -> Optional[bytes]:
        """
        Read until the broker closes the connection: the payload of the
        CLOSE frame it sent (its status code), or None if it sent none.
        """
        from zaichik.edge.websocket import CLOSE, parse_messages

        data = self.buffer
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionError:
                chunk = b""
            if not chunk:
                break
            data += chunk
        self.buffer = b""
        for opcode, payload in parse_messages(data)[0]:
            if opcode == CLOSE:
                self.closed_with = payload
        return self.closed_with

    def close(self) -> None:
        self.sock.close()


REDIS_SERVER = "redis-server"


class RedisServer:
    """
    A real C{redis-server} on a free loopback port, in a directory of its
    own (for C{appendonly}), for the Redis engine's tests and benchmarks.
    C{persistent}: C{appendonly yes} with C{appendfsync always}, so a
    restart keeps everything acknowledged; otherwise nothing is saved and a
    restart loses everything (what the engine must detect).
    """

    def __init__(self, persistent: bool = False, cluster: bool = False, port: int = 0,
                 options: Sequence[str] = ()) -> None:
        self.options = list(options)  # more redis-server options
        self.persistent = persistent
        self.cluster = cluster
        self.port = port
        self._kept = bool(port)  # a port given, or listened on: never chosen again
        self.dir = tempfile.mkdtemp(prefix="zaichik-redis-")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """
        Start it; return once it answers PING.  A port it chose (a
        L{free_port}) found taken at its first start is chosen again; a port
        given, or kept across L{restart}, is waited for a little.
        """
        retry_in_use(lambda: self._start(timeout))
        self._kept = True
        atexit.register(self.cleanup)
        return self

    def _start(self, timeout: float) -> None:
        if not self.port:
            self.port = _free_cluster_port() if self.cluster else free_port()
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--protected-mode", "no", "--logfile", "redis.log"]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        argv += self.options
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--cluster-replica-validity-factor", "0"]
        logged = len(self.log())  # the log is appended to across restarts: this start's part follows
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log()
                if IN_USE in log[logged:]:  # "Could not create server TCP listening socket ...: bind: ..."
                    error = PortInUse(f"redis-server could not listen on {self.port}, taken:\n{log}",
                                      renewable=not self._kept)
                    if not self._kept:
                        self.port = 0  # another at the next start
                    raise error
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            # (a short wait: another listener that took the port may never answer)
            if self.command("PING", timeout=2) == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer within {timeout} s:\n{self.log()}")

    def command(self, *args: str, timeout: float = 10) -> str:
        """Run one command with redis-cli; its output ('' if the server does not answer)."""
        try:
            return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                                  text=True, timeout=timeout).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(10)
        self.process = None

    def restart(self) -> "RedisServer":
        """Stop and start again on the same port and directory."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop(kill=True)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import random

    for _ in range(100):
        port = random.randrange(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a Redis cluster node")


class RedisCluster:
    """A Redis Cluster of C{size} primaries (no replicas) on loopback, made with C{redis-cli --cluster create}."""

    def __init__(self, size: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [RedisServer(cluster=True) for _ in range(size * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        for node in self.nodes:
            node.start()
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"], capture_output=True, check=True,
                       timeout=timeout)
        deadline = time.monotonic() + timeout
        replicas = len(self.nodes) - len(self.nodes) // (1 + self.replicas)
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes) and all(
                    n.command("CLUSTER", "NODES").count("slave") == replicas for n in self.nodes) and all(
                    "master_link_status:up" in n.command("INFO", "replication") for n in self.nodes
                    if "role:slave" in n.command("INFO", "replication")):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not become ready")

    def owner(self, key: bytes) -> RedisServer:
        """The primary that now serves C{key}."""
        from zaichik.storage.resp import key_slot

        slot = key_slot(key)
        for node in self.nodes:
            if node.process is None:
                continue
            answer = node.command("CLUSTER", "NODES")
            for row in answer.splitlines():
                fields = row.split()
                if "myself" in fields[2] and "master" in fields[2]:
                    for part in fields[8:]:
                        start, _, end = part.partition("-")
                        if start.isdigit() and int(start) <= slot <= int(end or start):
                            return node
        raise RuntimeError(f"no primary serves slot {slot}")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def have_redis() -> bool:
    import shutil

    return shutil.which(REDIS_SERVER) is not None and shutil.which("redis-cli") is not None
