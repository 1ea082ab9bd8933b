"""The clean-room admin client (tests/independent_admin.py, PROTOCOL.md §19 alone) against one
real `chimera node` process on loopback: the local socket, the remote CurveZMQ API with admin
keys of each role, the audit log read back, malformed requests and a streaming command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nacl.signing
import pytest

from tests.independent_admin import (AdminClientError, LocalAdmin, MAX_REQUEST_BYTES, RemoteAdmin, fingerprint,
                                     load_private_key, pack, signed_request, transport_key_from)


def _wait(predicate, timeout_s: float = 60.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return predicate()


def _chimera(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chimera.node.cli", *args], capture_output=True, text=True,
                          timeout=120)


class Node:
    """One `chimera node` process; ``sock`` its admin socket."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.sock = data_dir / "admin.sock"
        self.log = open(data_dir.parent / "node.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chimera.node.cli", "node", "--data-dir", str(data_dir), "--no-mdns",
             "--listen", "127.0.0.1", "--port", "0", "--set", "admin_listen=tcp://127.0.0.1:0"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def answers(self) -> dict | None:
        if self.proc.poll() is not None:
            pytest.fail(f"node exited {self.proc.returncode}: {(self.data_dir.parent / 'node.log').read_text()}")
        try:
            with LocalAdmin(self.sock, timeout_s=5) as c:
                return c.call("whoami")
        except (AdminClientError, OSError):
            return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    base = tmp_path_factory.mktemp("adm")
    data_dir = base / "n"
    out = _chimera("network", "init", "--data-dir", str(data_dir), "--name", "adm")
    assert out.returncode == 0, out.stderr
    n = Node(data_dir)
    try:
        who = _wait(n.answers, 90)
        assert who and who["ok"], who
        n.whoami = who["result"]
        keys = {}
        for name, role in (("obs", "observer"), ("ops", "operator"), ("adm", "admin")):
            pem = base / f"{name}.pem"
            out = _chimera("admin", "key", "create", name, "--role", role, "--out", str(pem),
                           "--data-dir", str(data_dir))
            assert out.returncode == 0, out.stderr
            assert (os.stat(pem).st_mode & 0o777) == 0o600  # §19.4
            keys[name] = load_private_key(pem.read_bytes())
        n.keys = keys
        yield n
    finally:
        assert n.stop() == 0


def _remote(node, key) -> RemoteAdmin:
    who = node.whoami
    return RemoteAdmin(who["remote_admin"], transport_key_from(who["server_key"]), key, who["node"])


def _audit(node, limit: int = 200) -> list[dict]:
    with LocalAdmin(node.sock) as c:
        doc = c.call("audit", {"limit": limit})
    assert doc["ok"] is True, doc
    return doc["result"]


def test_local_socket_status_and_peers(node):
    """§19.1 framing on DATA_DIR/admin.sock, §19.2 response wrapper; the owner acts as admin."""
    assert (os.stat(node.sock).st_mode & 0o777) == 0o600
    with LocalAdmin(node.sock) as c:
        status = c.call("status")
        assert set(status) == {"ok", "result"} and status["ok"] is True, status
        assert isinstance(status["result"], dict)
        peers = c.call("peers")  # the same connection carries a second request
        assert set(peers) == {"ok", "result"} and peers["ok"] is True and peers["result"] == [], peers
        who = c.call("whoami")["result"]
    assert who["transport"] == "local" and who["role"] == "admin" and who["who"] == f"local-owner uid={os.getuid()}"
    # §19.2 "node": the fingerprint of the transport public key (§2), which server_key carries
    assert who["node"] == fingerprint(transport_key_from(who["server_key"]))
    assert who["remote_admin"].startswith("tcp://127.0.0.1:") and not who["remote_admin"].endswith(":0")
    # status fields (§19.5, commands of the node core)
    st = status["result"]
    assert st["peer_id"] == who["peer_id"] and st["transport_key_fingerprint"] == who["node"], st
    assert st["protocol_version"] == 1 and st["members"] == {"alive": 0, "suspect": 0, "dead": 0, "left": 0}, st
    assert transport_key_from(st["contact"]) == transport_key_from(who["server_key"]) and st["pid"] == node.proc.pid
    assert st["consensus"]["role"] == "validator" and isinstance(st["counters"], dict), st
    # a signed request on the local socket gets the key's role (§19.4)
    with LocalAdmin(node.sock, key=node.keys["obs"], node_fingerprint=who["node"]) as c:
        mine = c.call("whoami")["result"]
        assert mine["role"] == "observer" and mine["transport"] == "local", mine
        refused = c.call("log_level", {"level": "debug"})
        assert refused["ok"] is False and refused["code"] == 4, refused


def test_remote_roles_audit_and_unknown_key(node):
    obs, ops, adm = node.keys["obs"], node.keys["ops"], node.keys["adm"]
    with _remote(node, obs) as c:
        status = c.call("status")
        assert status["ok"] is True and isinstance(status["result"], dict), status
        assert c.call("whoami")["result"]["role"] == "observer"
        refused = c.call("log_level", {"level": "debug"})
        assert refused["ok"] is False and refused["code"] == 4, refused  # §19.3: role too low
        refused = c.call("propose", {"data": "from an observer"})
        assert refused["ok"] is False and refused["code"] == 4, refused
    with _remote(node, ops) as c:
        who = c.call("whoami")["result"]
        assert who["transport"] == "remote" and who["role"] == "operator"
        assert who["who"] == f"ops ({fingerprint(bytes(ops.verify_key))})"
        changed = c.call("log_level", {"level": "debug"})  # admin-only: refused to an operator
        assert changed["ok"] is False and changed["code"] == 4, changed
    with _remote(node, adm) as c:
        changed = c.call("log_level", {"level": "debug"})
        assert changed["ok"] is True and changed["result"]["new"] == "debug", changed
        assert c.call("log_level", {"level": "info"})["ok"] is True
        # a replayed request (same nonce) is refused (§19.2)
        replay = signed_request(adm, node.whoami["node"], "status", nonce=b"n" * 16)
        c.send_frame(pack(replay))
        assert c.recv_frame()["ok"] is True
        c.send_frame(pack(replay))
        again = c.recv_frame()
        assert again["ok"] is False and again["code"] == 4, again
        # a stale one (sent_at_ms off by more than 60 s) too
        stale = c.call("status", sent_at_ms=int(time.time() * 1000) - 120_000)
        assert stale["ok"] is False and stale["code"] == 4, stale
    stranger = nacl.signing.SigningKey.generate()
    with _remote(node, stranger) as c:
        refused = c.call("status")
        assert refused["ok"] is False and refused["code"] == 4, refused
        # unsigned remote requests are refused too (§19.1)
        c.send_frame(pack({"cmd": "status", "args": {}}))
        unsigned = c.recv_frame()
        assert unsigned["ok"] is False and unsigned["code"] == 4, unsigned

    # §19.6: the change and the refusals, read back through the API
    rows = _audit(node)
    columns = {"id", "at_ms", "who", "transport", "role", "command", "args", "result", "duration_s", "count"}
    assert all(set(row) == columns for row in rows), rows
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows), rows  # oldest first
    adm_fp = fingerprint(bytes(adm.verify_key))
    change = [r for r in rows if r["command"] == "log_level" and r["result"] == "ok"]
    assert change, rows
    row = change[0]
    assert row["who"] == f"adm ({adm_fp})" and row["transport"] == "remote" and row["role"] == "admin", row
    assert row["args"] == {"level": "debug"}, row  # the JSON column, decoded
    assert abs(row["at_ms"] - time.time() * 1000) < 600_000 and row["duration_s"] >= 0 and row["count"] >= 1
    # refusals are aggregated per source and second (§19.6): the first one's row carries the count
    # of all 7 made above (observer x2, operator x1, replay, stale, stranger x2), all from 127.0.0.1
    refusals = [r for r in rows if r["transport"] == "remote" and r["result"].startswith("refused: ")]
    assert sum(r["count"] for r in refusals) == 7, "\n".join(map(str, rows))
    first = refusals[0]
    assert first["command"] == "log_level" and first["who"] == f"obs ({fingerprint(bytes(obs.verify_key))})", first


def test_operator_propose_is_audited(node):
    """An operator's change (propose) runs and is in the audit log with its args."""
    ops = node.keys["ops"]
    with LocalAdmin(node.sock) as c:
        spec = {x["name"]: x for x in c.call("commands")["result"]}
    assert spec["propose"]["role"] == "operator" and spec["propose"]["stream"] is False
    assert spec["events_follow"]["stream"] is True
    arg = spec["propose"]["args"][0]
    with _remote(node, ops) as c:
        done = c.call("propose", {arg: "clean-room decision"})
    assert done["ok"] is True, done
    rows = [r for r in _audit(node) if r["command"] == "propose" and r["result"] == "ok"]
    assert rows and rows[-1]["who"] == f"ops ({fingerprint(bytes(ops.verify_key))})", rows
    assert rows[-1]["role"] == "operator" and "clean-room decision" in str(rows[-1]["args"]), rows


def test_malformed_requests_get_code_2_and_the_node_keeps_serving(node):
    bad = [
        pack({"cmd": 5, "args": {}}),                       # cmd not a str
        pack({"cmd": "status", "args": [1, 2]}),            # args not a map
        pack({"cmd": "no_such_command", "args": {}}),       # unknown command
        pack({"cmd": "audit", "args": {"limit": "many"}}),  # bad argument type
        pack({"cmd": "audit", "args": {"limit": 0}}),       # out of range (1..10000)
        pack([1, 2, 3]),                                    # not a map
        b"\xc1",                                            # not msgpack
        pack({"cmd": "status", "args": {"x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}}),  # nested > 16
        pack({"cmd": "status", "args": {f"k{i}": i for i in range(65)}}),  # map > 64 entries
    ]
    with LocalAdmin(node.sock) as c:
        for frame in bad:
            c.send_frame(frame)
            doc = c.recv_frame()
            assert doc["ok"] is False and doc["code"] == 2 and isinstance(doc["error"], str), (frame[:40], doc)
            assert "\n" not in doc["error"]
            assert c.call("status")["ok"] is True  # the same connection goes on
    # an oversize length prefix: answered with an error, then the connection is closed
    with LocalAdmin(node.sock) as c:
        c.send_frame(b"", length=MAX_REQUEST_BYTES + 1)
        doc = c.recv_frame()
        assert doc["ok"] is False and doc["code"] == 2, doc
        with pytest.raises(AdminClientError):
            c.recv_frame()
    with LocalAdmin(node.sock) as c:
        assert c.call("status")["ok"] is True
    # remote: a malformed signed part is code 4, a bad outer request code 2, and it keeps serving
    adm = node.keys["adm"]
    with _remote(node, adm) as c:
        # the signed part lacks args, nonce and sent_at_ms: refused, code 4
        signed = pack({"node": node.whoami["node"], "key": fingerprint(bytes(adm.verify_key)), "cmd": "status"})
        c.send_frame(pack({"signed": signed, "sig": adm.sign(b"chimera-admin-request-v1\x00" + signed).signature}))
        doc = c.recv_frame()
        assert doc["ok"] is False and doc["code"] == 4, doc
        c.send_frame(b"\xc1")  # the outer request unreadable: malformed, code 2
        doc = c.recv_frame()
        assert doc["ok"] is False and doc["code"] == 2, doc
        unknown = c.call("no_such_command")
        assert unknown["ok"] is False and unknown["code"] == 2, unknown
        assert c.call("status")["ok"] is True
        # a message over ZMQ_MAXMSGSIZE: libzmq drops the connection, nothing answers it; the
        # DEALER reconnects and the next requests are served (every answer read is a status)
        c.send_frame(b"\x00" * (MAX_REQUEST_BYTES + 1024 + 1))
        answers: list[dict] = []

        def served() -> bool:
            c.send_frame(pack(signed_request(adm, node.whoami["node"], "status")))
            try:
                answers.append(c.recv_frame(timeout_s=2))
            except AdminClientError:
                return False
            return True

        assert _wait(served, 90), answers
        assert all(a["ok"] is True and "peer_id" in a["result"] for a in answers), answers
    malformed = [r for r in _audit(node, 500) if r["command"] == "no_such_command"]
    assert malformed and all(r["result"].startswith(("error: ", "refused: ")) for r in malformed), malformed


def test_events_follow_stream_framing_and_end(node):
    """§19.2 streaming: first {"ok": true, "result": {"stream": CMD}}, then {"event": RECORD} frames,
    then {"end": REASON} and the node closes the connection; a client's byte ends it with no end
    frame. Not served remotely (code 2)."""
    with LocalAdmin(node.sock) as follower:
        frames = follower.follow("events_follow", {"kind": "decision_committed", "max_events": 1,
                                                   "duration_s": 120})
        first = next(frames)
        assert first == {"ok": True, "result": {"stream": "events_follow"}}, first
        with LocalAdmin(node.sock) as c:
            assert c.call("propose", {"data": "streamed"})["ok"] is True
        rest = list(frames)
        assert _wait(follower.closed_by_node, 30)
    assert len(rest) == 2, rest
    event, end = rest
    assert set(event) == {"event"} and event["event"]["kind"] == "decision_committed", event
    record = event["event"]
    assert {"kind", "peer_id", "at_ms", "priority", "height", "index", "data"} <= set(record), record  # §19.8
    assert record["priority"] == "info" and record["peer_id"] == node.whoami["peer_id"], record
    assert end == {"end": "done"}, end  # max_events reached
    # a duration that passes with no event: the end frame alone
    with LocalAdmin(node.sock) as follower:
        frames = list(follower.follow("events_follow", {"kind": "peer_failed", "duration_s": 0.5}))
    assert frames == [{"ok": True, "result": {"stream": "events_follow"}}, {"end": "done"}], frames
    # the client ends it: any byte; no end frame, the node closes the connection
    with LocalAdmin(node.sock) as follower:
        frames = follower.follow("events_follow", {"kind": "peer_failed"})
        assert next(frames)["ok"] is True
        follower.hang_up()
        assert _wait(follower.closed_by_node, 30)
    # each stream's row is written when it ends: "ok (N records, REASON)"
    results = lambda: [r["result"] for r in _audit(node) if r["command"] == "events_follow"]  # noqa: E731
    assert _wait(lambda: len(results()) >= 3, 30), results()
    assert results()[-3:] == ["ok (1 records, done)", "ok (0 records, done)", "ok (0 records, client closed)"]
    # a kind filter naming no kind is a usage error (§19.8)
    with LocalAdmin(node.sock) as c:
        doc = c.call("events_follow", {"kind": "peer_faild"})
        assert doc["ok"] is False and doc["code"] == 2, doc
    # not served remotely (§19.1)
    with _remote(node, node.keys["adm"]) as c:
        doc = c.call("events_follow", {"max_events": 1})
        assert doc["ok"] is False and doc["code"] == 2, doc
