#!/usr/bin/env python3
"""TLS clients for the custody-proxy end-to-end tests (python's ssl module: a real client).

Each subcommand prints one line per fact it checked ("ok: ...") and exits 0, or prints
"FAIL: ..." and exits 1. Every socket operation has a timeout, so nothing hangs.

  relay-while-held ADDR CA CTL N  the never-blocking promise (see its docstring)
  admission ADDR CA CTL N LIMIT   N clients, max_handshakes LIMIT, signatures held
  keyd-down ADDR CA PHASE          PHASE=open: open a connection, relay, keep it open, wait
                                   for "go" on stdin, relay again byte for byte
  relay ADDR CA [SIZE]             SIZE random bytes through an echo backend, unchanged
  busy-relays ADDR CA N SIZE       N connections echo SIZE bytes each at once while another one
                                   connects and makes small round trips (see its docstring)
  half-close ADDR CA               data and close_notify in one write, then only reading: the
                                   echo comes back whole, then the proxy's close_notify
  truncate ADDR CA                 data and the TCP FIN in one go, no close_notify: the proxy
                                   ends the connection (before its idle timeout)
  idle ADDR CA                     relay once, then wait for the proxy to close (idle timeout)
  idle-buffers ADDR CA N BUFFER    N quiet connections give their relay buffers back, a stuck
                                   one keeps its bytes (see its docstring)
  bad-input ADDR KIND              garbage / partial / slowloris / silent: the proxy ends the
                                   connection; prints how
  hold ADDR CA SNI                 open a TLS connection, print "open", then for each stdin line
                                   send it as an HTTP request and print the response's first line
  resume ADDR CA VERSION [PID]     a full handshake (TLS 1.2 or 1.3) and an HTTP request, then a
                                   second connection offering its session; prints
                                   "resumed=True|False". With PID: SIGHUP the proxy in between and
                                   wait for the reload
"""
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"ok: {msg}", flush=True)


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def context(ca):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect(addr, ca, sni="ec256.lab.test", timeout=30):
    raw = socket.create_connection(split_addr(addr), timeout=timeout)
    return context(ca).wrap_socket(raw, server_hostname=sni)


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def echo_round(sock, payload):
    """Send payload through an echo backend and read it back (interleaved, so neither side's
    buffers fill up)."""
    got = bytearray()
    view = memoryview(payload)
    step = 16384
    for i in range(0, len(payload), step):
        sock.sendall(view[i:i + step])
        got += recv_exact(sock, len(view[i:i + step]))
    return bytes(got)


def proxy_metric(name):
    import urllib.request
    url = f"http://{os.environ['CUSTODY_PROXY_METRICS_ADDR']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return float(parts[1])
    return 0.0


def ctl(ctl_path, *args):
    r = subprocess.run([ctl_path, *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail(f"custodyctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class HeldHandshakes:
    """N client handshakes started at once (in threads) while the key service holds every
    signature; release() lets them finish and checks they all did."""

    def __init__(self, addr, ca, ctl_path, n):
        self.ctl_path = ctl_path
        self.n = n
        self.results = [None] * n
        ctl(ctl_path, "--identity", "admin", "testing", "set-fault", "--hold")
        started = threading.Barrier(n + 1)

        def handshake(i):
            try:
                started.wait(timeout=30)
                self.results[i] = ("ok", connect(addr, ca, timeout=60))
            except Exception as e:  # noqa: BLE001 - reported by release()
                self.results[i] = ("error", repr(e))

        self.threads = [threading.Thread(target=handshake, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()
        started.wait(timeout=30)

    def finished(self):
        return [r for r in self.results if r is not None]

    def release(self):
        """Clears the hold, releases the held signatures; returns the N connections."""
        ctl(self.ctl_path, "--identity", "admin", "testing", "set-fault")
        ctl(self.ctl_path, "--identity", "admin", "testing", "release-held")
        for t in self.threads:
            t.join(timeout=90)
        bad = [r for r in self.results if r is None or r[0] != "ok"]
        if bad:
            fail(f"{len(bad)} of {self.n} handshakes failed after release: {bad[:3]}")
        return [s for _, s in self.results]


def relay_while_held(addr, ca, ctl_path, n):
    """With one worker and the key service holding every signature back: an open connection
    keeps relaying while N handshakes wait at once, and all N finish once released."""
    n = int(n)
    a = connect(addr, ca)
    first = os.urandom(100000)
    if echo_round(a, first) != first:
        fail("connection A: echo before the hold differs")
    ok("connection A open and relaying (100000 bytes echoed)")

    held = HeldHandshakes(addr, ca, ctl_path, n)
    # Wait until every handshake is paused on its signature: the proxy's own gauge of
    # signatures awaited (polled, no sleep-based guess).
    deadline = time.time() + 60
    while True:
        waiting = proxy_metric("custody_proxy_signs_in_flight")
        if waiting >= n:
            break
        if held.finished():
            fail(f"a handshake finished while signatures were held: {held.finished()}")
        if time.time() > deadline:
            fail(f"only {waiting} of {n} handshakes reached the key service")
        time.sleep(0.05)
    ok(f"{int(waiting)} handshakes paused at once on the key service, none finished")

    # The same single worker keeps relaying for A while those handshakes are paused.
    for round_no in range(5):
        payload = os.urandom(200000)
        if echo_round(a, payload) != payload:
            fail(f"connection A: echo round {round_no} differs while handshakes are held")
    if held.finished():
        fail(f"{len(held.finished())} handshake(s) finished while the key service held signatures")
    ok("connection A relayed 5 x 200000 bytes while every handshake stayed paused")

    released = held.release()
    ok(f"all {n} held handshakes completed after release")
    for s in released:
        payload = os.urandom(1000)
        if echo_round(s, payload) != payload:
            fail("a released connection does not relay")
        s.close()
    ok(f"all {n} released connections relay")
    payload = os.urandom(1000)
    if echo_round(a, payload) != payload:
        fail("connection A stopped relaying")
    a.close()


def admission(addr, ca, ctl_path, n, limit):
    """With max_handshakes = LIMIT and every signature held: N clients connect, only LIMIT
    handshakes are admitted (the rest wait in the kernel's backlog), and all N finish once the
    signatures are released."""
    n, limit = int(n), int(limit)
    held = HeldHandshakes(addr, ca, ctl_path, n)
    # The admitted handshakes reach the key service once their ClientHello is read: poll until
    # LIMIT of them wait there, and check that never more do.
    deadline = time.time() + 60
    waiting = 0
    while waiting < limit or proxy_metric(
            'custody_proxy_accept_paused_total{reason="handshakes"}') < 1:
        waiting = proxy_metric("custody_proxy_signs_in_flight")
        if waiting > limit:
            fail(f"{waiting} handshakes waiting for a signature; the limit is {limit}")
        if time.time() > deadline:
            fail(f"{waiting} handshakes waiting, accepting not paused, after 60 s")
        time.sleep(0.05)
    for _ in range(10):  # The rest stay in the backlog.
        waiting = proxy_metric("custody_proxy_signs_in_flight")
        if waiting != limit:
            fail(f"{waiting} handshakes waiting for a signature; the limit is {limit}")
        time.sleep(0.05)
    if held.finished():
        fail("a handshake finished while signatures were held")
    ok(f"{n} clients, {int(waiting)} handshakes admitted (the limit), accepting paused")
    for s in held.release():
        s.close()
    ok(f"all {n} handshakes completed once released (the backlog was admitted in turn)")


def keyd_down(addr, ca):
    """Opens a connection and relays; waits for "go" on stdin (the test kills keyd meanwhile);
    relays again, byte for byte."""
    a = connect(addr, ca)
    payload = os.urandom(300000)
    if echo_round(a, payload) != payload:
        fail("echo before keyd went down differs")
    print("open", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        fail(f"expected 'go', got {line!r}")
    payload = os.urandom(1 << 20)
    if echo_round(a, payload) != payload:
        fail("established connection: echo after keyd went down differs")
    ok("established connection relayed 1 MiB byte for byte with keyd down")
    a.close()


def relay(addr, ca, size="1048576", sni="ec256.lab.test"):
    """One connection through an echo backend: SIZE random bytes come back unchanged."""
    s = connect(addr, ca, sni)
    payload = os.urandom(int(size))
    if echo_round(s, payload) != payload:
        fail("echo differs")
    s.close()
    ok(f"{size} bytes relayed both ways, unchanged")


def memory_tls(addr, ca, sni="ec256.lab.test"):
    """A TLS client over memory BIOs, so that the test decides what goes on the wire and when."""
    raw = socket.create_connection(split_addr(addr), timeout=30)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context(ca).wrap_bio(incoming, outgoing, server_hostname=sni)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            if not data:
                fail("the proxy closed during the handshake")
            incoming.write(data)
    raw.sendall(outgoing.read())
    return raw, tls, incoming, outgoing


class BusyEcho:
    """One connection pushing SIZE random bytes through the echo backend as fast as the proxy
    takes them, reading the echo as it comes: a memory-BIO TLS client on a non-blocking socket,
    so one thread keeps many such connections busy at once."""

    def __init__(self, addr, ca, size):
        self.raw, self.tls, self.incoming, self.outgoing = memory_tls(addr, ca)
        self.raw.setblocking(False)
        self.payload = os.urandom(size)
        self.sent = 0
        self.wire = bytearray()  # Ciphertext not yet taken by the socket.
        self.got = bytearray()

    def done(self):
        return len(self.got) >= len(self.payload)

    def step(self):
        """Moves what it can without blocking; returns whether anything moved."""
        moved = False
        while self.sent < len(self.payload) and len(self.wire) < 262144:
            chunk = self.payload[self.sent:self.sent + 16384]
            self.tls.write(chunk)
            self.sent += len(chunk)
            self.wire += self.outgoing.read()
        if self.wire:
            try:
                n = self.raw.send(self.wire)
                del self.wire[:n]
                moved = moved or n > 0
            except BlockingIOError:
                pass
        try:
            data = self.raw.recv(262144)
            if not data:
                fail(f"busy-relays: the proxy closed a busy connection after {len(self.got)} bytes")
            self.incoming.write(data)
            moved = True
        except BlockingIOError:
            pass
        while True:
            try:
                chunk = self.tls.read(262144)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                fail("busy-relays: a busy connection ended early")
            self.got += chunk
        return moved


def busy_relays(addr, ca, n, size):
    """N connections each echo SIZE random bytes at once, while a further connection is made
    and does 20 small round trips. Run with one buffer per relay turn, every busy turn ends at
    the limit and the busy relays take turns in the worker's queue: the newcomer's handshake and
    round trips must all be answered while every busy transfer still runs (a busy relay queued
    for its turn never keeps the rest of the worker waiting), and every busy byte must come back
    unchanged (a busy relay is never dropped from the queue)."""
    n, size = int(n), int(size)
    busy = [BusyEcho(addr, ca, size) for _ in range(n)]
    result = {}

    def newcomer():
        try:
            s = connect(addr, ca)
            for i in range(20):
                payload = os.urandom(100)
                if echo_round(s, payload) != payload:
                    result["error"] = f"round trip {i} came back changed"
                    return
            s.close()
            result["unfinished"] = sum(1 for b in busy if not b.done())
        except (OSError, ssl.SSLError) as e:
            result["error"] = str(e)

    started = None
    deadline = time.monotonic() + 120
    while not all(b.done() for b in busy):
        if time.monotonic() > deadline:
            fail("busy-relays: the busy transfers did not finish within 120 s")
        moved = False
        for b in busy:
            moved = b.step() or moved
        if started is None and all(len(b.got) >= size // 8 for b in busy):
            started = threading.Thread(target=newcomer)
            started.start()
        if not moved:
            select.select([b.raw for b in busy], [b.raw for b in busy if b.wire], [], 0.05)
    for b in busy:
        b.raw.close()
        if bytes(b.got) != b.payload:
            fail("busy-relays: a busy transfer's echo differs")
    ok(f"busy-relays: {n} busy transfers of {size} bytes each came back unchanged")
    if started is None:
        fail("busy-relays: the transfers never all got going")
    started.join(60)
    if "error" in result:
        fail(f"busy-relays: the newcomer: {result['error']}")
    if "unfinished" not in result:
        fail("busy-relays: the newcomer did not finish")
    if result["unfinished"] != n:
        fail(f"busy-relays: the newcomer finished after {n - result['unfinished']} busy transfer(s)")
    ok(f"busy-relays: a newcomer's handshake and 20 round trips were answered while all {n} "
       "busy transfers ran")


def half_close(addr, ca):
    """The client's close_notify arrives with its last bytes; the proxy passes the end on to the
    backend (shutdown(SHUT_WR)) once they are delivered, and keeps relaying the other way: the
    echo backend's answer comes back whole, then the proxy's close_notify."""
    raw, tls, incoming, outgoing = memory_tls(addr, ca)
    payload = os.urandom(200000)
    tls.write(payload)
    try:
        tls.unwrap()  # Queues our close_notify; the peer's is read below.
    except ssl.SSLWantReadError:
        pass
    raw.sendall(outgoing.read())  # The data and the close_notify, in one go.
    got = bytearray()
    ended = False
    while not ended:
        data = raw.recv(65536)
        if not data:
            break
        incoming.write(data)
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                ended = True
                break
            if not chunk:
                ended = True
                break
            got += chunk
    raw.close()
    if bytes(got) != payload:
        fail(f"half-close: {len(got)} of {len(payload)} bytes came back")
    ok("half-close: 200000 bytes sent with close_notify came back whole")
    if not ended:
        fail("half-close: the connection ended without the proxy's close_notify")
    ok("half-close: then the proxy's close_notify (the backend's end, passed on)")


def truncate(addr, ca):
    """Application data and the FIN together, without close_notify: the proxy must see the end
    at once (not at its idle timeout), although the FIN came in with the last bytes."""
    raw, tls, incoming, outgoing = memory_tls(addr, ca)
    # One echo first, so that the proxy is idle in its relay (not still in the handshake, whose
    # reads would take the data and the FIN along) when the last words come.
    tls.write(b"ping")
    raw.sendall(outgoing.read())
    echo = b""
    while len(echo) < 4:
        data = raw.recv(65536)
        if not data:
            fail("truncation: the proxy closed before the echo")
        incoming.write(data)
        try:
            echo += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    tls.write(b"last words")
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)  # Held back, to leave with the FIN:
    raw.sendall(outgoing.read())
    raw.shutdown(socket.SHUT_WR)  # one segment, data and FIN, one readiness event.
    raw.settimeout(30)
    try:
        while raw.recv(65536):
            pass
    except socket.timeout:
        fail("truncation: the connection is still open 30 s after the client's FIN")
    except OSError:
        pass  # Reset: ended too.
    raw.close()
    ok("truncation: the proxy ended the connection after the client's FIN came with its data")


def http_get(sock, f, path, host):
    """One HTTP/1.1 request on a keep-alive connection (f: the socket's reader, kept across
    requests); returns the status line and body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status = f.readline().decode().strip()
    length = 0
    while True:
        h = f.readline().decode().strip()
        if not h:
            break
        if h.lower().startswith("content-length:"):
            length = int(h.split(":")[1])
    body = f.read(length).decode().strip()
    return status, body


def resume(addr, ca, version, reload_pid=None):
    """Connects twice through an HTTP backend: the second connection offers the first one's
    session (its ticket). With RELOAD_PID, the proxy is reloaded (SIGHUP) in between."""
    ctx = context(ca)
    ctx.maximum_version = ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
    first = ctx.wrap_socket(socket.create_connection(split_addr(addr), timeout=30),
                            server_hostname="ec256.lab.test")
    # TLS 1.3 tickets arrive after the handshake: a request and its answer read them.
    status, _ = http_get(first, first.makefile("rb"), "/first", "ec256.lab.test")
    if " 200" not in status:
        fail(f"first connection: {status!r}")
    session = first.session
    reused = first.session_reused
    first.close()
    if reused:
        fail("the first connection was resumed")
    if reload_pid is not None:
        name = 'custody_proxy_config_reloads_total{outcome="ok"}'
        before = proxy_metric(name)
        os.kill(int(reload_pid), signal.SIGHUP)
        deadline = time.monotonic() + 20
        while proxy_metric(name) <= before:
            if time.monotonic() > deadline:
                fail("the proxy did not reload within 20 s")
            time.sleep(0.05)
        ok("the proxy reloaded between the two connections")
    second = ctx.wrap_socket(socket.create_connection(split_addr(addr), timeout=30),
                             server_hostname="ec256.lab.test", session=session)
    status, _ = http_get(second, second.makefile("rb"), "/second", "ec256.lab.test")
    if " 200" not in status:
        fail(f"second connection: {status!r}")
    print(f"resumed={second.session_reused}", flush=True)
    second.close()


def idle(addr, ca):
    """Relays once, then stays silent: the proxy must end the connection (idle timeout)."""
    s = connect(addr, ca)
    payload = os.urandom(1000)
    if echo_round(s, payload) != payload:
        fail("echo differs")
    s.settimeout(60)
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        fail("the idle connection was not closed within 60 s")
    except (ssl.SSLError, OSError):
        pass
    ok("an idle connection was closed by the proxy")


def wait_metric(name, want, timeout=30):
    """Polls the proxy's metric NAME until it equals WANT; returns the last value seen."""
    deadline = time.monotonic() + timeout
    value = proxy_metric(name)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.1)
        value = proxy_metric(name)
    return value


def idle_buffers(addr, ca, n, buffer_bytes):
    """Idle connections hold no relay buffer; bytes waiting in one are never dropped.

    N connections relay once and go quiet. One more (over memory BIOs) sends without reading
    until its socket takes nothing for 2 s: the echo backend stops reading once its answers
    back up, so bytes wait in both of that connection's relay buffers. The proxy's
    custody_proxy_relay_buffer_bytes must come down to exactly those two buffers (the quiet
    ones gave theirs back; the stuck one, idle too, kept its bytes). Then the stuck connection
    reads every byte back unchanged, each quiet one relays again unchanged, and once all are
    closed the gauge is 0."""
    n, buffer_bytes = int(n), int(buffer_bytes)
    gauge = "custody_proxy_relay_buffer_bytes"
    quiet = [connect(addr, ca) for _ in range(n)]
    for s in quiet:
        payload = os.urandom(1000)
        if echo_round(s, payload) != payload:
            fail("echo differs before going quiet")

    raw, tls, incoming, outgoing = memory_tls(addr, ca)
    raw.setblocking(False)
    sent = bytearray()
    pending = b""  # Records not yet taken by the socket.
    while True:
        if not pending:
            if len(sent) >= 256 << 20:
                fail("256 MiB sent and the connection never backed up")
            chunk = os.urandom(65536)
            tls.write(chunk)
            sent += chunk
            pending = outgoing.read()
        _, writable, _ = select.select([], [raw], [], 2)
        if not writable:
            break  # Every buffer on the way is full.
        try:
            pending = pending[raw.send(pending):]
        except BlockingIOError:
            pass
    held = wait_metric(gauge, 2 * buffer_bytes)
    if held != 2 * buffer_bytes:
        fail(f"{gauge} is {held:.0f}, not {2 * buffer_bytes} (the stuck connection's two)")
    ok(f"{n} idle connections gave their relay buffers back; the backed-up one kept its two "
       f"({held:.0f} bytes)")

    got = bytearray()
    while len(got) < len(sent):
        readable, writable, _ = select.select([raw], [raw] if pending else [], [], 30)
        if not readable and not writable:
            fail(f"the echo stopped after {len(got)} of {len(sent)} bytes")
        if writable:
            try:
                pending = pending[raw.send(pending):]
            except BlockingIOError:
                pass
        if readable:
            data = raw.recv(1 << 20)
            if not data:
                fail(f"the proxy closed after {len(got)} of {len(sent)} bytes")
            incoming.write(data)
            while True:
                try:
                    got += tls.read(1 << 20)
                except ssl.SSLWantReadError:
                    break
    if got != sent:
        fail("the backed-up connection's echo differs")
    ok(f"the backed-up connection got all {len(sent)} bytes back, unchanged")

    for s in quiet:
        payload = os.urandom(100000)
        if echo_round(s, payload) != payload:
            fail("echo differs after the buffers were given back")
    ok(f"the {n} quiet connections relay again, unchanged")
    for s in quiet:
        s.close()
    raw.close()
    left = wait_metric(gauge, 0)
    if left != 0:
        fail(f"{gauge} is {left:.0f} with every connection closed")
    ok(f"{gauge} is 0 once all are closed")


def bad_input(addr, kind):
    """Sends bad bytes of one KIND and reports how the proxy ended the connection."""
    s = socket.create_connection(split_addr(addr), timeout=30)
    # A real ClientHello to cut short, from python's own TLS client.
    hello = None
    if kind in ("partial", "slowloris"):
        inc = ssl.MemoryBIO()
        out = ssl.MemoryBIO()
        obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname="ec256.lab.test")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
    start = time.time()
    try:
        if kind == "garbage":
            s.sendall(os.urandom(700))
        elif kind == "http":
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        elif kind == "partial":
            s.sendall(hello[: len(hello) // 2])
        elif kind == "slowloris":
            # One byte at a time, forever (until the proxy ends it).
            for b in hello[:-1]:
                s.sendall(bytes([b]))
                r, _, _ = select_read(s, 0.2)
                if r:
                    break
        elif kind == "silent":
            pass
        s.settimeout(60)
        data = s.recv(4096)
        while data:
            data = s.recv(4096)
        how = "closed"
    except ConnectionResetError:
        how = "reset"
    except (BrokenPipeError, ConnectionAbortedError):
        how = "reset"
    except socket.timeout:
        fail(f"{kind}: the proxy did not end the connection within 60 s")
    ok(f"{kind}: the proxy ended the connection ({how}) after {time.time() - start:.1f} s")


def select_read(s, timeout):
    return select.select([s], [], [], timeout)


def hold(addr, ca, sni):
    s = connect(addr, ca, sni)
    print("open", flush=True)
    f = s.makefile("rb")
    for line in sys.stdin:
        status, body = http_get(s, f, line.strip(), sni)
        print(f"{status} | {body}", flush=True)
    s.close()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "relay-while-held":
        relay_while_held(*args)
    elif cmd == "admission":
        admission(*args)
    elif cmd == "keyd-down":
        keyd_down(*args)
    elif cmd == "relay":
        relay(*args)
    elif cmd == "busy-relays":
        busy_relays(*args)
    elif cmd == "half-close":
        half_close(*args)
    elif cmd == "truncate":
        truncate(*args)
    elif cmd == "idle":
        idle(*args)
    elif cmd == "idle-buffers":
        idle_buffers(*args)
    elif cmd == "bad-input":
        bad_input(*args)
    elif cmd == "hold":
        hold(*args)
    elif cmd == "resume":
        resume(*args)
    else:
        fail(f"unknown subcommand {cmd}")


if __name__ == "__main__":
    main()
