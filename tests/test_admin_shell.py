"""Admin API, keys and roles, audit log, remote admin and the real `chimera shell`."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pexpect
import pytest

from chimera.node import admin
from chimera.node.admin_keys import AdminKeyError, KeyRing, generate_key, public_bytes, sign_request, write_key_file
from chimera.node.config import NodeConfig
from chimera.node.launcher import LocalNetwork
from chimera.protocol.identity import unb32
from tests.conftest import FAST, async_wait_until, wait_until

CHIMERA = str(Path(sys.executable).with_name("chimera"))
PROCESS_FAST = ["--set", "probe_interval_s=0.3", "--set", "probe_timeout_s=0.1",
                "--set", "reconnect_interval_s=0.5", "--set", "sync_interval_s=2",
                "--set", "consensus_commit_wait_s=0.05", "--set", "consensus_propose_timeout_s=1",
                "--set", "consensus_vote_timeout_s=0.5", "--set", "consensus_empty_block_interval_s=0.2",
                "--set", "admin_listen=tcp://127.0.0.1:0"]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("admin-net")
    network = LocalNetwork(workdir, 3, extra_args=PROCESS_FAST, epoch_length=50)
    try:
        network.start()
        assert wait_until(network.full_mesh, timeout_s=60), "no full mesh"
    except BaseException:
        network.stop()
        raise
    try:
        yield network
    finally:
        network.stop()


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", XDG_STATE_HOME=str(tmp_path / "state"),
                NO_COLOR="1", COLUMNS="200", LINES="50")


def _spawn(args: list[str], tmp_path: Path) -> pexpect.spawn:
    child = pexpect.spawn(CHIMERA, ["shell", *args], env=_env(tmp_path), encoding="utf-8",
                          dimensions=(50, 220), timeout=60)
    child.logfile_read = open(tmp_path / "shell.transcript", "a")
    return child


def _oneshot(args: list[str], tmp_path: Path, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CHIMERA, "shell", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=_env(tmp_path), stdin=subprocess.DEVNULL)


def test_interactive_shell_completion_peers_propose_history(net, tmp_path: Path):
    data_dir = net.peers[0].data_dir
    ids = [p.status["peer_id"] for p in net.peers]
    child = _spawn([str(data_dir)], tmp_path)
    try:
        child.expect("chimera admin@")
        child.send("pee\t")  # tab completes the only command starting "pee" (redraws may split it)
        child.expect(r"pee(\x1b\[[0-9;?]*[A-Za-z])*rs")
        child.send("\r")
        child.expect("PEER ID")
        for _ in ids:  # every id, in any order (self first)
            child.expect("|".join(ids))
        child.expect("chimera admin@")
        child.sendline('propose "hello from the shell"')
        child.expect("committed at height", timeout=90)
        child.expect("chimera admin@")
        child.sendline("log limit=50")
        child.expect("hello from the shell")
        child.expect("chimera admin@")
        child.sendline("help propose")
        child.expect("usage: propose")
        child.expect("needs role: operator")
        child.sendline("stop")  # destructive: asks, and "n" keeps the node running
        child.expect("really run")
        child.sendline("n")
        child.expect("cancelled")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert net.peers[0].alive()
    history = (tmp_path / "state" / "chimera-mesh" / "shell_history").read_text()
    assert "peers" in history and "hello from the shell" in history


def test_observer_key_is_refused_an_operator_command_and_it_is_audited(net, tmp_path: Path):
    data_dir = net.peers[0].data_dir
    key_file = tmp_path / "obs.pem"
    out = subprocess.run([CHIMERA, "admin", "key", "create", "watcher", "--role", "observer", "--out",
                          str(key_file), "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sha256:" in out.stdout and "PRIVATE" not in out.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    child = _spawn([str(data_dir), "--key", str(key_file)], tmp_path)
    try:
        child.expect("chimera observer@")
        child.sendline("status")
        child.expect("peer id ")
        child.sendline('propose "not allowed"')
        child.expect("refused: propose needs role operator")
        child.sendline("audit limit=20")
        child.expect(r"watcher \(sha256:[0-9a-f]+\)\s+local\s+observer\s+propose")
        child.expect("refused: needs operator")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    rows = json.loads(subprocess.run([CHIMERA, "audit", "--data-dir", str(data_dir), "--json", "--limit", "200"],
                                     capture_output=True, text=True, timeout=60).stdout)["result"]
    refusal = [r for r in rows if r["command"] == "propose" and r["result"].startswith("refused")]
    assert refusal and refusal[-1]["role"] == "observer" and refusal[-1]["args"] == {"data": "not allowed"}


def test_oneshot_json_errors_and_malformed_requests(net, tmp_path: Path):
    data_dir = net.peers[1].data_dir
    out = _oneshot([str(data_dir), "-c", "peers", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    others = {p.status["peer_id"] for i, p in enumerate(net.peers) if i != 1}
    assert doc["ok"] is True and others <= {r["peer_id"] for r in doc["result"]}
    out = _oneshot([str(data_dir), "-c", "frobnicate now", "--json"], tmp_path)
    assert out.returncode == 2 and json.loads(out.stdout) == {
        "ok": False, "error": json.loads(out.stdout)["error"], "code": 2}
    assert "unknown command" in json.loads(out.stdout)["error"] and "Traceback" not in out.stderr
    out = _oneshot([str(data_dir), "-c", "ping not-a-peer-id", "--json"], tmp_path)
    assert out.returncode == 2 and "bad arguments" in json.loads(out.stdout)["error"]
    out = _oneshot([str(data_dir), "-c", "stop"], tmp_path)  # destructive, no tty, no --yes
    assert out.returncode == 2 and "--yes" in out.stderr and out.stderr.count("\n") == 1
    out = _oneshot([str(tmp_path / "nowhere"), "-c", "status"], tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("chimera: ")
    # plain text when stdout is not a terminal: no escape sequences
    out = _oneshot([str(data_dir), "-c", "peers"], tmp_path)
    assert out.returncode == 0 and "\x1b[" not in out.stdout and "PEER ID" in out.stdout

    client = admin.LocalClient(data_dir / admin.SOCKET_NAME)
    assert client.send_raw(b"\xc1\xff not msgpack") == {"ok": False, "error": "request is not msgpack", "code": 2}
    assert client.send_raw(msgpack.packb([1, 2, 3]))["code"] == 2
    assert client.send_raw(msgpack.packb({"cmd": 7}))["code"] == 2
    assert client.send_raw(msgpack.packb({"cmd": "status", "args": "x"}))["error"] == "'args' must be a map"
    reply = client.send_raw(msgpack.packb({"cmd": "ping", "args": {}}))
    assert reply == {"ok": False, "error": "missing argument 'peer_id'", "code": 2}
    import socket as socket_mod
    raw = socket_mod.socket(socket_mod.AF_UNIX)
    raw.connect(str(data_dir / admin.SOCKET_NAME))
    raw.sendall(struct.pack(">I", 1 << 30))  # an absurd length: refused, connection closed
    assert b"too large" in raw.recv(4096)
    raw.close()
    raw = socket_mod.socket(socket_mod.AF_UNIX)
    raw.connect(str(data_dir / admin.SOCKET_NAME))
    raw.sendall(struct.pack(">I", 100) + b"short")  # then hang up mid-request
    raw.close()
    assert admin.call(data_dir, "status")["peer_id"] == net.peers[1].status["peer_id"]  # still serving
    assert net.peers[1].alive()


def test_socket_is_owner_only_and_revoked_or_unknown_keys_are_refused(net, tmp_path: Path):
    data_dir = net.peers[2].data_dir
    sock = data_dir / admin.SOCKET_NAME
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600

    op_key, stranger = generate_key(), generate_key()
    admin.call(data_dir, "admin_key_add", {"name": "ops", "role": "operator", "public_key": public_bytes(op_key)})
    local = admin.LocalClient(sock, op_key)
    assert local.call("whoami")["role"] == "operator"
    with pytest.raises(admin.AdminError, match="needs role admin") as err:
        local.call("config_set", {"field": "log_level", "value": "debug"})
    assert err.value.code == 4
    # a replayed signed request is refused
    body = msgpack.packb(sign_request(op_key, local.audience, "status", {}))
    assert local.send_raw(body)["ok"] is True
    assert "replayed" in local.send_raw(body)["error"]
    with pytest.raises(admin.AdminError, match="unknown admin key") as err:
        admin.LocalClient(sock, stranger).call("status")
    assert err.value.code == 4

    # remote: CURVE to the node's transport key, every request signed
    me = admin.call(data_dir, "whoami")
    endpoint, server_key = me["remote_admin"], unb32(me["server_key"])
    remote = admin.RemoteClient(endpoint, server_key, op_key, timeout_s=20)
    assert remote.call("whoami")["transport"] == "remote"
    assert remote.call("status")["peer_id"] == net.peers[2].status["peer_id"]
    with pytest.raises(admin.AdminError, match="unknown admin key"):
        admin.RemoteClient(endpoint, server_key, stranger, timeout_s=20).call("status")
    unsigned = remote.send_raw(msgpack.packb({"cmd": "status", "args": {}}))
    assert unsigned["code"] == 4 and "must be signed" in unsigned["error"]
    with pytest.raises(admin.AdminError) as err:  # wrong server key: no handshake, no answer
        admin.RemoteClient(endpoint, public_bytes(stranger), op_key, timeout_s=1.5).call("status")
    assert err.value.code == 3

    # revoke the key (through the CLI): refused locally and remotely from then on
    out = subprocess.run([CHIMERA, "admin", "key", "revoke", "ops", "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for client in (local, remote):
        with pytest.raises(admin.AdminError, match="is revoked") as err:
            client.call("status")
        assert err.value.code == 4
    # the shell speaks the remote API too; the refusal is its exit code
    key_file = tmp_path / "ops.pem"
    write_key_file(key_file, op_key)
    out = _oneshot([endpoint, "--key", str(key_file), "--server-key", me["server_key"], "-c", "status",
                    "--json"], tmp_path)
    assert out.returncode == 4 and "revoked" in json.loads(out.stdout)["error"]
    rows = admin.call(data_dir, "audit", {"limit": 200})
    refused = [r for r in rows if r["result"].startswith("refused")]
    assert {r["transport"] for r in refused} == {"local", "remote"}
    assert any("unknown admin key" in r["result"] for r in refused)
    assert any("revoked" in r["result"] and r["transport"] == "remote" for r in refused)
    listed = subprocess.run([CHIMERA, "admin", "key", "list", "--data-dir", str(data_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    keys = {k["name"]: k["state"] for k in json.loads(listed.stdout)["result"]}
    assert keys["ops"] == "revoked"


async def test_revoke_peer_admit_config_and_live_events(node_factory):
    a = await node_factory("a", NodeConfig(**FAST, metrics_port=0))
    b = await node_factory("b")
    b.add_contact_uri(a.contact_uri, static=True)
    b.run_membership_actions()
    assert await async_wait_until(lambda: b.peer_id in a.routes and a.peer_id in b.routes, 30)

    def call(cmd, args=None):
        return asyncio.to_thread(admin.call, a.data_dir, cmd, args)

    received: list[dict] = []

    def follow() -> None:
        client = admin.LocalClient(a.data_dir / admin.SOCKET_NAME)
        received.extend(client.follow("events_follow", {"kind": "peer_revoked,peer_admitted", "max_events": 2,
                                                         "duration_s": 60}))

    thread = threading.Thread(target=follow)
    thread.start()
    assert await async_wait_until(lambda: any(a.events.waiters), 10)
    res = await call("revoke_peer", {"peer_id": b.peer_id, "reason": "test"})
    assert res["was_member"] is True
    assert b.peer_id not in a.membership.members and b.peer_id not in a.routes
    assert await async_wait_until(lambda: a.counters["drop_revoked"] > 0, 30)  # b keeps trying; dropped
    assert b.peer_id not in a.membership.members
    assert [r["peer_id"] for r in await call("revoked_peers")] == [b.peer_id]
    assert a.store.db.execute("SELECT COUNT(*) FROM revoked_peers").fetchone()[0] == 1
    await call("admit", {"peer_id": b.peer_id, "uri": b.contact_uri})
    assert await async_wait_until(lambda: b.peer_id in a.membership.members
                                  and a.membership.members[b.peer_id].state.value == "alive", 30)
    await asyncio.to_thread(thread.join, 30)
    assert [e["kind"] for e in received] == ["peer_revoked", "peer_admitted"]

    with pytest.raises(admin.AdminError, match="cannot revoke itself"):
        await call("revoke_peer", {"peer_id": a.peer_id})
    assert (await call("config_set", {"field": "max_clock_skew_s", "value": "12.5"}))["new"] == 12.5
    assert a.opener.max_clock_skew_ms == 12500
    for bad in ("nan", "0.5", "inf"):  # the ranges of config.toml (config.RANGES)
        with pytest.raises(admin.AdminError, match="max_clock_skew_s") as refused:
            await call("config_set", {"field": "max_clock_skew_s", "value": bad})
        assert refused.value.code == admin.EXIT_USAGE and a.opener.max_clock_skew_ms == 12500
    await call("log_level", {"level": "warning"})
    assert (await call("config_get", {"field": "log_level"}))["value"] == "warning"
    await call("log_level", {"level": "info"})
    with pytest.raises(admin.AdminError, match="cannot be changed at runtime"):
        await call("config_set", {"field": "port", "value": 1})
    events = await call("events", {"kind": "peer_revoked", "min_priority": "warning"})
    assert [e["kind"] for e in events] == ["peer_revoked"]
    metrics = await call("metrics")  # the exporter is on: the same Prometheus text it serves
    assert metrics["format"] == "prometheus" and 'chimera_envelopes_dropped_total{reason="revoked"}' in metrics["text"]
    assert (await asyncio.to_thread(admin.call, b.data_dir, "metrics"))["format"] == "summary"
    rows = await call("audit", {"limit": 50})
    revoke_row = next(r for r in rows if r["command"] == "revoke_peer" and r["result"] == "ok")
    assert revoke_row["who"].startswith("local-owner uid=") and revoke_row["role"] == "admin"


def test_key_ring_refuses_a_key_that_could_never_verify(tmp_path: Path):
    """A small-order key (the identity point) parses as Ed25519 but no signature by it
    verifies under PROTOCOL.md §6.2's rule: refused when added, with a clear error."""
    ring = KeyRing.open(tmp_path)
    with pytest.raises(AdminKeyError, match="usable Ed25519"):
        ring.add("odd", "operator", bytes([1]) + bytes(31), 0)
    with pytest.raises(AdminKeyError, match="32 raw"):
        ring.add("short", "operator", bytes(31), 0)
    good = ring.add("alice", "operator", public_bytes(generate_key()), 0)
    assert [k.name for k in ring.list()] == [good.name]


def test_audit_redacts_secrets():
    from chimera.node.audit import redact

    doc = redact({"token": "chm1_secret", "api_key": b"x", "Password": "p", "data": b"\x01" * 100,
                  "small": b"\x02\x03", "nested": {"client_secret": 1, "n": 2}})
    assert doc["token"] == doc["api_key"] == doc["Password"] == "<redacted>"
    assert doc["data"].startswith("<100 bytes sha256:") and doc["small"] == "0203"
    assert doc["nested"] == {"client_secret": "<redacted>", "n": 2}


def test_shell_grammar_types_values_conservatively(tmp_path: Path):
    from chimera.node.shell import Shell, ShellError

    class Fake:
        target = "fake"

        def call(self, cmd, args=None, timeout_s=None):
            assert cmd == "commands"
            return [{"name": "propose", "args": ["data", "timeout_s", "count"], "help": "", "role": "operator"},
                    {"name": "agents_list", "args": [], "help": "", "role": "observer"},
                    {"name": "train_start", "args": ["job", "timeout_s"], "help": "", "role": "operator"},
    {"name": "train_export", "args": ["job"], "help": "", "role": "operator"},
                    {"name": "fit", "args": ["epochs", "lr", "fast", "name"], "help": "", "role": "operator"},
                    {"name": "events", "args": ["limit"], "help": "", "role": "observer"},
                    {"name": "events_follow", "args": [], "help": "", "role": "observer", "stream": True}]

    shell = Shell(Fake())
    assert shell.parse('propose "42" 3.5 count=2') == ("propose", {"data": "42", "timeout_s": 3.5, "count": 2})
    assert shell.parse("agent list") == ("agents_list", {})
    assert shell.parse("fit epochs=3 lr=0.1 fast=true name=x") == (
        "fit", {"epochs": 3, "lr": 0.1, "fast": True, "name": "x"})
    assert shell.parse("train start job=x timeout_s=5") == ("train_start", {"job": "x", "timeout_s": 5})
    assert shell.parse("events follow") == ("events_follow", {})
    assert shell.parse("events 5") == ("events", {"limit": 5})
    assert shell.parse("propose data=__import__('os')") == ("propose", {"data": "__import__(os)"})
    (tmp_path / "blob.bin").write_bytes(b"\x00wasm")
    assert shell.parse(f"propose @{tmp_path / 'blob.bin'}") == ("propose", {"data": b"\x00wasm"})
    assert shell.parse("propose @@home") == ("propose", {"data": "@home"})
    for bad in ("nothing here", "propose a 1 2 3", 'propose "unclosed', f"propose @{tmp_path / 'missing'}"):
        with pytest.raises(ShellError):
            shell.parse(bad)


def test_admin_listen_must_be_a_tcp_endpoint(tmp_path: Path):
    from chimera.node.config import ConfigError, load_config

    assert load_config(tmp_path, environ={}, overrides={"admin_listen": "tcp://127.0.0.1:7421"}).admin_listen
    for bad in ("127.0.0.1:7421", "tcp://:7421", "tcp://host:port", "tcp://host:70000"):
        with pytest.raises(ConfigError, match="admin_listen"):
            load_config(tmp_path, environ={}, overrides={"admin_listen": bad})


async def test_another_uid_is_refused_even_if_the_socket_mode_were_opened(node_factory, tmp_path: Path):
    """Defence in depth: the socket is 0600, but if its mode were widened by mistake a client of
    another uid is still refused (SO_PEERCRED) and the refusal is audited."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to connect as another uid")
    node = await node_factory("u", NodeConfig(**FAST))
    sock = node.data_dir / admin.SOCKET_NAME
    public_dir = Path(tempfile.mkdtemp(prefix="chimera-uid-"))
    try:
        public_dir.chmod(0o755)
        link = public_dir / "admin.sock"
        os.link(sock, link)  # the same socket, reachable by path for another user
        link.chmod(0o666)    # the misconfiguration
        request = msgpack.packb({"cmd": "status", "args": {}})
        client = ("import socket, struct, sys\n"
                  "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                  f"body = {request!r}\n"
                  "s.sendall(struct.pack('>I', len(body)) + body)\n"
                  "n = struct.unpack('>I', s.recv(4))[0]\n"
                  "data = b''\n"
                  "while len(data) < n: data += s.recv(n - len(data))\n"
                  "sys.stdout.write(repr(data))\n")
        proc = await asyncio.to_thread(
            subprocess.run, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "/usr/bin/python3", "-c", client, str(link)],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "not this node" in proc.stdout and "owner" in proc.stdout
        rows = await asyncio.to_thread(admin.call, node.data_dir, "audit", {"limit": 20})
        assert any("refused" in r["result"] and "65534" in r["who"] for r in rows), rows
        assert (await asyncio.to_thread(admin.call, node.data_dir, "status"))["peer_id"] == node.peer_id
    finally:
        shutil.rmtree(public_dir, ignore_errors=True)


# ------------------------------------------------ the shell's bad-input promises


FAKE_COMMANDS = [
    {"name": "peers", "args": [], "help": "", "role": "observer"},
    {"name": "log", "args": ["limit", "from_height"], "help": "", "role": "observer"},
    {"name": "certificate", "args": ["height"], "help": "", "role": "observer"},
    {"name": "train_start", "args": ["job", "timeout_s"], "help": "", "role": "operator"},
    {"name": "train_export", "args": ["job"], "help": "", "role": "operator"},
    {"name": "agents_deploy", "args": ["ref", "module", "kind"], "help": "", "role": "operator"},
    {"name": "tasks_submit", "args": ["module", "input"], "help": "", "role": "operator"},
    {"name": "propose", "args": ["data", "timeout_s", "count"], "help": "", "role": "operator"},
    {"name": "plugin_thing", "args": [], "help": "a handler this shell does not know", "role": "admin"},
]


class FakeNode:
    """A client that answers `commands` and records what it would send (packed as the real one)."""

    target = "fake"
    timeout_s = 10.0

    def __init__(self, answer=None):
        self.sent: list[tuple[str, dict]] = []
        self.answer = answer

    def call(self, cmd, args=None, timeout_s=None):
        if cmd == "commands":
            return FAKE_COMMANDS
        msgpack.packb({"cmd": cmd, "args": args or {}}, use_bin_type=True)  # what the real clients do
        self.sent.append((cmd, dict(args or {})))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _run_line(line: str, answer=None, json_output: bool = False):
    import io

    from chimera.node.shell import Shell

    out = io.StringIO()
    node = FakeNode(answer)
    shell = Shell(node, json_output=json_output, out=out, interactive=True)  # errors to `out` too
    code = shell.execute(line)
    return code, out.getvalue(), node


def test_shell_refuses_integers_msgpack_cannot_carry_and_never_raises():
    """Bug: an int outside msgpack's range raised OverflowError out of Shell.execute (a
    traceback one-shot, the end of an interactive session)."""
    from chimera.node.shell import Shell, ShellError

    for line, name in (("certificate height=99999999999999999999999", "height"),
                       ("log limit=99999999999999999999", "limit"), ("log -9223372036854775809", "limit"),
                       ("log from_height=" + "9" * 5000, "from_height")):
        code, out, node = _run_line(line)
        assert code == 2 and not node.sent, (line, out)
        assert out.startswith(f"error: {name} must be an integer in") and out.count("\n") == 1, out
        assert len(out) < 200
        with pytest.raises(ShellError, match=name):
            Shell(FakeNode()).parse(line)
    assert _run_line("log limit=18446744073709551615")[2].sent == [("log", {"limit": 2**64 - 1})]
    assert _run_line("log limit=-9223372036854775808")[2].sent == [("log", {"limit": -(2**63)})]
    # any other failure sending the request or formatting the answer: one line, code 1
    code, out, _ = _run_line("peers", answer=RuntimeError("boom\nsecond line"))
    assert code == 1 and out == "error: internal error: RuntimeError: boom second line\n"
    code, out, _ = _run_line("peers", answer=[{"peer_id": "x"}])  # a row without "state": render fails
    assert code == 1 and out.startswith("error: internal error: KeyError") and out.count("\n") == 1
    code, out, _ = _run_line("peers", answer=RuntimeError("boom"), json_output=True)
    assert code == 1 and json.loads(out)["code"] == 1


def test_shell_rejects_arguments_a_command_does_not_take():
    """Bug: `peers foo=bar` ran `peers` and ignored foo."""
    code, out, node = _run_line("peers foo=bar")
    assert code == 2 and not node.sent and out == "error: peers: unknown argument 'foo' (takes no arguments)\n"
    code, out, node = _run_line("log limit=3 lmit=4")
    assert code == 2 and not node.sent and "unknown argument 'lmit' (takes: limit from_height)" in out
    # arguments a handler reads without listing them still pass; a command the shell does not
    # know and the node lists without arguments is not second-guessed
    assert _run_line("tasks submit module=@@x replicas=3 wait=true")[2].sent == [
        ("tasks_submit", {"module": "@x", "replicas": 3, "wait": True})]
    assert _run_line("plugin thing anything=1")[2].sent == [("plugin_thing", {"anything": 1})]


def test_shell_error_echoes_a_bounded_part_of_the_input():
    """Bug: an unknown command echoed the whole line (100 KB back)."""
    code, out, _ = _run_line("x" * 100_000)
    assert code == 2 and len(out) < 200 and "x" * 40 + "..." in out and out.count("\n") == 1
    code, out, _ = _run_line("peers " + "y" * 100_000 + "=1")
    assert code == 2 and len(out) < 200 and "..." in out


def test_shell_job_file_errors_name_the_file_and_the_parser_message(tmp_path: Path):
    """Bug: `train start job=@bad.toml` said "job must be TOML text or a map" (the file's bytes
    were sent; even a good file failed), and missing arguments were reported late or not at all."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[job]\nname = "x"\nrounds = \n')
    code, out, node = _run_line(f"train start job=@{bad}")
    assert code == 2 and not node.sent and out.count("\n") == 1
    assert str(bad) in out and "Invalid value (at line 3, column 10)" in out
    good = tmp_path / "good.toml"
    good.write_text('[job]\nname = "x"\n')
    assert _run_line(f"train start job=@{good}")[2].sent == [("train_start", {"job": '[job]\nname = "x"\n'})]
    code, out, node = _run_line("train start")
    assert code == 2 and not node.sent and "train start: missing argument 'job'" in out
    code, out, node = _run_line("agents deploy")
    assert code == 2 and not node.sent and "agent deploy: missing argument 'ref'" in out
    code, out, node = _run_line("agents deploy wordfreq@1")
    assert code == 2 and not node.sent and "missing argument 'module'" in out


def test_shell_history_file_is_owner_only(tmp_path: Path, monkeypatch):
    """Bug: the history (it can hold secrets typed as arguments) was created 0644."""
    from chimera.node.shell import history_path

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "fresh"))
    path = history_path()
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "old"))
    old = tmp_path / "old" / "chimera-mesh" / "shell_history"
    old.parent.mkdir(parents=True)
    old.write_text("\n# 2024\n+secret\n")
    old.chmod(0o644)
    assert history_path() == old and stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_text() == "\n# 2024\n+secret\n"


def test_shell_bad_input_against_a_real_node(net, tmp_path: Path):
    """One-shot: one line, no traceback, code 2; a piped script honours `exit`; the interactive
    session survives all of it (and its history file is 0600)."""
    data_dir = net.peers[0].data_dir
    for line in ("certificate height=99999999999999999999999", "log limit=99999999999999999999",
                 "peers foo=bar", "z" * 100_000):
        out = _oneshot([str(data_dir), "-c", line], tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and len(out.stderr) < 300
    out = subprocess.run([CHIMERA, "shell", str(data_dir)], input="peers\nexit\nstatus\n", capture_output=True,
                         text=True, timeout=60, env=_env(tmp_path))
    assert out.returncode == 0 and out.stderr == "" and "PEER ID" in out.stdout
    assert "counters" not in out.stdout  # `status` after `exit` did not run
    out = subprocess.run([CHIMERA, "shell", str(data_dir)], input="quit 3\npeers\n", capture_output=True,
                         text=True, timeout=60, env=_env(tmp_path))
    assert out.returncode == 3 and out.stdout == ""

    child = _spawn([str(data_dir)], tmp_path)
    try:
        child.expect("chimera admin@")
        child.sendline("certificate height=99999999999999999999999")
        child.expect("error: height must be an integer in")
        child.expect("chimera admin@")
        child.sendline("log limit=99999999999999999999")
        child.expect("error: limit must be an integer in")
        child.expect("chimera admin@")
        child.sendline("whoami")
        child.expect("local-owner")
        child.expect("chimera admin@")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = tmp_path / "state" / "chimera-mesh" / "shell_history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600 and "99999999999999999999999" in history.read_text()


def test_the_shell_names_command_groups_as_the_cli_and_keeps_the_plural():
    """The shell listed `agents deploy`, `tasks submit` where `chimera` says `agent deploy`,
    `task submit`: help and errors use the CLI's word now, the admin API's plural still parses."""
    from chimera.node.shell import Shell

    shell = Shell(FakeNode())
    listing = shell.help([])
    assert "agent deploy" in listing and "task submit" in listing and "agents deploy" not in listing
    assert shell.parse("agents deploy wf@1 module=@@x") == shell.parse("agent deploy wf@1 module=@@x") == (
        "agents_deploy", {"ref": "wf@1", "module": "@x"})
    assert shell.parse("tasks submit module=@@m") == shell.parse("task submit module=@@m")
    usage = shell.help(["agents", "deploy"]).splitlines()
    assert usage[0].startswith("usage: agent deploy [ref]") and "  admin command: agents_deploy" in usage
    assert "agent deploy" in shell.phrases() and "task submit" in shell.phrases()
    from prompt_toolkit.document import Document

    from chimera.node.shell import _completer

    def complete(text: str) -> list[str]:
        return [c.text for c in _completer(shell).get_completions(Document(text), None)]

    assert complete("agent de") == ["agent deploy"] and complete("agents de") == ["agents deploy"]
    assert complete("agent deploy ") == complete("agents deploy ") == ["ref=", "module=", "kind=", "sha256="]
    assert "rule=" in complete("tasks submit r") and "rule=" in complete("task submit r")


def test_the_cli_and_the_shell_show_the_same_tables(net, tmp_path: Path):
    """Against a real node: `chimera peers` and the shell's `peers` (and `reputation`) print the
    same columns under the same headers, this node's own row first."""
    data_dir = str(net.peers[0].data_dir)
    me = net.peers[0].status["peer_id"]
    for line, argv in (("peers", ["peers"]), ("reputation", ["reputation"])):
        shell = _oneshot([data_dir, "-c", line], tmp_path)
        cli = subprocess.run([CHIMERA, *argv, "--data-dir", data_dir], capture_output=True, text=True,
                             timeout=60, env=_env(tmp_path))
        assert shell.returncode == cli.returncode == 0, (shell.stderr, cli.stderr)
        header = [x for x in shell.stdout.splitlines() if x.startswith("PEER ID")]
        assert header and header == [x for x in cli.stdout.splitlines() if x.startswith("PEER ID")], (
            shell.stdout, cli.stdout)
    for out in (shell.stdout, cli.stdout):  # reputation: every peer, weights and scores
        assert all(p.status["peer_id"] in out for p in net.peers)
    cli = subprocess.run([CHIMERA, "peers", "--data-dir", data_dir], capture_output=True, text=True, timeout=60)
    lines = cli.stdout.splitlines()
    assert lines[0].split()[:4] == ["PEER", "ID", "STATE", "INC"] and lines[1].split()[:2] == [me, "self"]
    assert len(lines) == 1 + len(net.peers)


def test_shell_exit_ends_any_runner():
    """Bug: in a piped script (no terminal) `exit` was "unknown command 'exit'", code 2."""
    for line, code in (("exit", 0), ("quit", 0), ("  exit 3 ", 3)):
        with pytest.raises(SystemExit) as done:
            _run_line(line)
        assert done.value.code == code
    assert _run_line("exit now")[0] == 2


def test_train_export_refuses_a_directory_an_empty_path_and_a_force_that_is_no_bool(tmp_path: Path):
    """A directory as the path wrote FILE.npz next to it (outside it); force=no overwrote."""
    existing = tmp_path / "m.npz"
    existing.write_bytes(b"keep")
    for line, message in ((f"train export path={tmp_path}", "is a directory"),
                          (f"train export path={tmp_path}/", "is a directory"),
                          (f"train export path={existing} force=no", "force must be true or false"),
                          (f"train export path={existing} force=maybe", "force must be true or false"),
                          (f"train export path={existing}", "exists")):
        code, out, node = _run_line(line)
        assert code == 2 and message in out and not node.sent, (line, out)
    assert existing.read_bytes() == b"keep" and not (tmp_path.parent / f"{tmp_path.name}.npz").exists()


def test_text_from_peers_reaches_the_terminal_escaped():
    """A member's contact address (up to 128 characters after tcp://), an agent name or an
    event field is a peer's text: an ESC in it was printed raw by `peers` and the shell."""
    from chimera.node.shell import event_line, peers_text, render

    evil = "tcp://10.0.0.1:7420\x1b[2J\x1b]0;owned\x07\n fake line"
    row = {"peer_id": "p" * 52, "state": "alive", "incarnation": 1, "rtt_ms": None, "last_seen_s": 0.5,
           "addresses": [evil]}
    for text in (peers_text([row]), render("peers", [row]),
                 event_line({"at_ms": 0, "kind": "task_completed", "peer_id": "p", "reason": evil})):
        assert "\x1b" not in text and "\x07" not in text and "\n fake line" not in text, text
        assert "\\x1b[2J" in text and "\\n fake line" in text, text


def test_a_usage_error_about_a_positional_word_says_how_the_words_were_mapped():
    """`propose hello from shell`: 'from' fills timeout_s and the node's error named timeout_s
    only; the shell now says how the words were mapped (an operator saw no reason)."""
    from chimera.node.admin import AdminError

    refusal = AdminError("timeout_s must be a number in [0.1, 3600], not 'from'", 2)
    code, out, node = _run_line("propose hello from shell", answer=refusal)
    assert code == 2 and node.sent == [("propose", {"data": "hello", "timeout_s": "from", "count": "shell"})]
    assert out == ("error: timeout_s must be a number in [0.1, 3600], not 'from' (the words after the command "
                   "filled data, timeout_s, count in order; quote text with spaces)\n"), out
    code, out, _ = _run_line('propose "hello from shell" 5', answer=AdminError("timeout_s is wrong", 2))
    assert out == "error: timeout_s is wrong (the words after the command filled data, timeout_s in order; " \
                  "quote text with spaces)\n", out
    code, out, _ = _run_line("propose hello", answer=AdminError("data is wrong", 2))
    assert out == "error: data is wrong\n"  # one word: nothing to explain
