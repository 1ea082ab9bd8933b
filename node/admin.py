"""The admin API: a local Unix socket, optionally a remote CurveZMQ endpoint.

Local: ``DATA_DIR/admin.sock`` (mode 0600, peer credentials checked with
``SO_PEERCRED`` where the platform has it). Framing: 4-byte big-endian length,
then a msgpack map. Request ``{"cmd": str, "args": map}`` (the node's owner:
role ``admin``) or a signed request ``{"signed": bin, "sig": bin}``
(:mod:`.admin_keys`; the key's role applies). Response ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": str, "code": int}``.

Remote (``admin_listen = "tcp://HOST:PORT"``, off by default): a ZeroMQ ROUTER,
CURVE server with the node's transport key; each message is one request map
and must be signed, and each answer is one response map.

Every request, refused ones included, is appended to the audit log
(:mod:`.audit`, written by its own thread): the answer is sent once the row is
durable, and the event loop never waits for the disk meanwhile. Requests are
records dispatched by name, never evaluated; every error is one line with a
code from :data:`EXIT_CODES`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sqlite3
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import msgpack
import zmq
import zmq.asyncio
from zmq.auth.base import Authenticator
from zmq.utils import z85

from chimera.protocol.errors import MalformedError, RemoteProtocolError
from chimera.protocol.identity import fingerprint

from . import admin_keys
from . import audit as audit_log
from .admin_keys import COMMAND_HELP, COMMAND_OPTIONS, AdminKeyError, KeyRing, Refused, RequestVerifier, required_role, role_allows
from .audit import AuditLog
from .config import tcp_endpoint_port
from .logs import printable
from .transport import serve_zap

log = logging.getLogger("chimera.admin")

MAX_REQUEST_BYTES = 17 * 1024 * 1024  # agents_deploy / tasks_submit carry a .wasm of up to 16 MiB
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
SOCKET_NAME = "admin.sock"
STREAM_WRITE_TIMEOUT_S = 10.0
STREAM_KEY_CHECK_S = 5.0  # a stream opened with an admin key ends within this long of its revocation
MAX_REMOTE_IN_FLIGHT = 16
THREAD_VERIFY_BYTES = 256 * 1024  # signed parts longer than this are verified in a worker thread
REMOTE_RCVHWM = 4  # requests libzmq queues per remote connection (each up to MAX_REQUEST_BYTES)

# Exit codes of `chimera shell`, `chimera admin`, `chimera audit` and the "code"
# of an error response.
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_NODE, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAIL: "the command failed at the node (runtime error)",
    EXIT_USAGE: "malformed request, unknown command or bad arguments",
    EXIT_NO_NODE: "no node answered (not running, wrong address or server key, timeout)",
    EXIT_REFUSED: "refused: not authenticated, key unknown or revoked, or role too low",
}


def os_error_text(what: str, exc: OSError) -> str:
    """One line for an OSError met while doing ``what``: ``WHAT: STRERROR (PATH)``, e.g.
    ``agents_deploy: No space left on device (/data/agents/x.wasm)``; without an errno (a
    TimeoutError, an OSError raised with a message only) the exception's text or type name."""
    text = exc.strerror if exc.strerror else (str(exc) or type(exc).__name__)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return printable(f"{what}: {text}" + (f" ({' -> '.join(paths)})" if paths else ""))[:400]


class AdminError(Exception):
    """The node answered with an error, or could not be reached (``code``: see EXIT_CODES)."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------ argument helpers
#
# Every admin handler reads its arguments through these: a value of the wrong
# type (a bool for an int, a float or text for an int, inf or NaN for a number)
# or out of range is a usage error (code 2) naming the argument, never an
# internal error. An absent argument, or one given as nil, takes ``default``;
# without a default it is required.

REQUIRED: Any = object()
"""``default`` of an argument that must be given."""
SQL_INT_MAX = 2**63 - 1
"""The largest integer SQLite stores (a bound for heights, counts and ids read from the store)."""


def _shown(value: object) -> str:
    if type(value) is int and value.bit_length() > 128:  # repr of a 5000-digit int raises
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)  # 5.0, not 5: the value as it arrived
    return text if len(text) <= 40 else text[:37] + "..."


def _present(args: dict, name: str, default: Any) -> tuple[bool, Any]:
    """(given, value): the argument, or ``default`` when it is absent or nil."""
    value = args.get(name)
    if value is None:
        if default is REQUIRED:
            raise AdminError(f"missing argument {name!r}", EXIT_USAGE)
        return False, default
    return True, value


def int_arg(args: dict, name: str, default: Any = REQUIRED, lo: int = 0, hi: int = SQL_INT_MAX) -> Any:
    """``args[name]`` as an int in ``lo..hi`` (``default``, returned as is, when absent or nil).

    Raises:
        AdminError (EXIT_USAGE): missing without a default, not an int (a bool, a
            float, text) or outside ``lo..hi``.
    """
    given, value = _present(args, name, default)
    if not given:
        return value
    if type(value) is not int:
        raise AdminError(f"{name} must be an integer in {lo}..{hi}, not {_shown(value)}", EXIT_USAGE)
    if not lo <= value <= hi:
        raise AdminError(f"{name} must be in {lo}..{hi}, not {_shown(value)}", EXIT_USAGE)
    return value


def float_arg(args: dict, name: str, default: Any = REQUIRED, lo: float = 0.0, hi: float = 1e9) -> Any:
    """``args[name]`` (an int or a float) as a finite float in ``[lo, hi]`` (``default`` when absent).

    Raises:
        AdminError (EXIT_USAGE): missing without a default, not a number (a bool,
            text), infinite, NaN or outside ``[lo, hi]``.
    """
    given, value = _present(args, name, default)
    if not given:
        return value
    if type(value) not in (int, float):
        raise AdminError(f"{name} must be a number in [{lo:g}, {hi:g}], not {_shown(value)}", EXIT_USAGE)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and lo <= number <= hi):
        raise AdminError(f"{name} must be in [{lo:g}, {hi:g}], not {_shown(value)}", EXIT_USAGE)
    return number


def _sized(name: str, value: Any, max_len: int, kind: type, what: str, unit: str) -> Any:
    """``value`` if it is a ``kind`` of at most ``max_len`` ``unit``; else a usage error."""
    if type(value) is not kind:
        raise AdminError(f"{name} must be {what}, not {type(value).__name__} {_shown(value)}", EXIT_USAGE)
    if len(value) > max_len:
        raise AdminError(f"{name} is {len(value)} {unit}; the limit is {max_len}", EXIT_USAGE)
    return value


def str_arg(args: dict, name: str, default: Any = REQUIRED, max_len: int = 1024,
            choices: tuple[str, ...] | None = None) -> Any:
    """``args[name]`` as text of at most ``max_len`` characters (one of ``choices`` if given).

    Raises:
        AdminError (EXIT_USAGE): missing without a default, not text, too long, or not a choice.
    """
    given, value = _present(args, name, default)
    if not given:
        return value
    _sized(name, value, max_len, str, "text", "characters")
    if choices is not None and value not in choices:
        raise AdminError(f"{name} must be one of {', '.join(choices)}, not {_shown(value)}", EXIT_USAGE)
    return value


def bool_arg(args: dict, name: str, default: Any = False) -> Any:
    """``args[name]`` as a bool (true or false only; ``default`` when absent).

    Raises:
        AdminError (EXIT_USAGE): missing without a default, or not a bool.
    """
    given, value = _present(args, name, default)
    if not given:
        return value
    if type(value) is not bool:
        raise AdminError(f"{name} must be true or false, not {_shown(value)}", EXIT_USAGE)
    return value


def bytes_arg(args: dict, name: str, default: Any = REQUIRED, max_len: int = 65536, *,
              text: bool = False) -> Any:
    """``args[name]`` as bytes of at most ``max_len`` (``default`` when absent); with ``text``,
    a string is accepted too and encoded as UTF-8.

    Raises:
        AdminError (EXIT_USAGE): missing without a default, not bytes (or text), or too long.
    """
    given, value = _present(args, name, default)
    if not given:
        return value
    if text and type(value) is str:
        _sized(name, value, max_len, str, "text", "characters")  # refused before encoding a huge one
        value = value.encode()
    return _sized(name, value, max_len, bytes, "bytes or text" if text else "bytes", "bytes")


Handler = Callable[[dict], Awaitable[Any]]
Stream = Callable[[dict], AsyncIterator[dict]]


@dataclass(frozen=True, slots=True)
class Principal:
    who: str
    role: str
    transport: str  # "local" or "remote"
    key: str | None = None  # the admin key's fingerprint (signed requests)


def _error(message: str, code: int) -> dict:
    return {"ok": False, "error": message, "code": code}


class AdminServer:
    """Serves ``handlers`` (and ``streams``) on the local socket and, if asked, remotely.

    Args:
        path: the Unix socket path.
        handlers: command name -> ``async f(args) -> result``.
        streams: command name -> ``f(args) -> async iterator of records`` (local only).
        db: the node's SQLite connection (admin keys and audit log); None: no
            audit and no signed requests (owner only).
        node_fingerprint: this node's transport-key fingerprint (signed requests' audience).
        remote_endpoint: ``tcp://HOST:PORT`` for the remote API, or None.
        transport_keys: ``(secret, public)`` raw CURVE keys for the remote API.
        counters: the node's counters (the remote API counts ``zap_errors`` there); None: its own.
    """

    def __init__(self, path: Path, handlers: dict[str, Handler], *, streams: dict[str, Stream] | None = None,
                 db=None, node_fingerprint: str = "", remote_endpoint: str | None = None,
                 transport_keys: tuple[bytes, bytes] | None = None, counters: Counter | None = None) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.streams = dict(streams or {})
        self.server: asyncio.AbstractServer | None = None
        self.keys = KeyRing(db) if db is not None else None
        self.audit = AuditLog(db, background=True) if db is not None else None
        self.verifier = RequestVerifier(self.keys, node_fingerprint) if self.keys is not None else None
        self.remote: RemoteAdminServer | None = None
        if remote_endpoint:
            if transport_keys is None:
                raise ValueError("the remote admin API needs the node's transport keys")
            self.remote = RemoteAdminServer(remote_endpoint, *transport_keys, self.dispatch, counters=counters)
        builtins: dict[str, Handler] = {"commands": self._commands, "whoami": self._whoami}
        if self.keys is not None:
            builtins.update(audit=self._audit, admin_key_add=self._key_add,
                            admin_key_list=self._key_list, admin_key_revoke=self._key_revoke)
        for name, fn in builtins.items():
            self.handlers.setdefault(name, fn)
        self._principal: Principal | None = None  # of the request being run (for whoami)

    async def start(self) -> None:
        if self.path.exists() or self.path.is_socket():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        self.path.chmod(0o600)
        if self.remote is not None:
            await self.remote.start()

    @property
    def remote_port(self) -> int | None:
        return None if self.remote is None else self.remote.port

    # ----------------------------------------------------------- local socket

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer.get_extra_info("socket"))
        try:
            while True:
                try:
                    header = await reader.readexactly(4)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                (size,) = struct.unpack(">I", header)
                if size > MAX_REQUEST_BYTES:
                    await self._audit_row(Principal(_local_who(uid), "-", "local"), "-", {},
                                          f"error: request of {size} bytes is too large", 0.0)
                    await _write(writer, _error(f"request too large ({size} > {MAX_REQUEST_BYTES} bytes)",
                                                EXIT_USAGE))
                    return
                body = await reader.readexactly(size)
                response, stream = await self.dispatch(body, "local", uid=uid)
                await _write(writer, response)
                if stream is not None:
                    await self._run_stream(stream, reader, writer)
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _run_stream(self, stream: "_OpenStream", reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        """Write one ``{"event": record}`` frame per item, then ``{"end": reason}``.

        A stream opened with an admin key re-reads the key every :data:`STREAM_KEY_CHECK_S`
        and ends (``"admin key revoked"``) once it is revoked.
        """
        started = time.perf_counter()
        it = stream.iterator.__aiter__()
        eof = asyncio.ensure_future(reader.read(1))  # any byte, or EOF, ends the stream
        nxt: asyncio.Future | None = None
        sent, reason = 0, "done"
        checked = time.monotonic()
        try:
            while True:
                if stream.principal.key is not None and time.monotonic() - checked >= STREAM_KEY_CHECK_S:
                    checked = time.monotonic()
                    if not self._key_active(stream.principal.key):
                        reason = "admin key revoked"
                        break
                if nxt is None:
                    nxt = asyncio.ensure_future(it.__anext__())
                timeout = STREAM_KEY_CHECK_S if stream.principal.key is not None else None
                done, _ = await asyncio.wait({nxt, eof}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if eof in done and nxt not in done:
                    reason = "client closed"
                    break
                if nxt not in done:
                    continue  # time to look at the key again
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    break
                finally:
                    nxt = None
                await asyncio.wait_for(_write(writer, {"event": item}), STREAM_WRITE_TIMEOUT_S)
                sent += 1
            if reason != "client closed":
                await asyncio.wait_for(_write(writer, {"end": reason}), STREAM_WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            reason = "client too slow"
        except (ConnectionError, RuntimeError):
            reason = "client closed"
        finally:
            if nxt is not None:
                nxt.cancel()
            eof.cancel()
            try:
                await it.aclose()
            except (AttributeError, RuntimeError):
                pass
            self._audit_row_nowait(stream.principal, stream.cmd, stream.args,
                                   f"ok ({sent} records, {reason})", time.perf_counter() - started)

    def _key_active(self, fp: str) -> bool:
        """Whether the admin key ``fp`` is still registered and not revoked (a store error: no)."""
        try:
            key = self.keys.get(fp) if self.keys is not None else None
        except Exception:
            log.exception("could not re-read admin key %s", fp)
            return False
        return key is not None and key.revoked_ms is None

    # --------------------------------------------------------------- dispatch

    async def dispatch(self, body: bytes, transport: str, *, uid: int | None = None,
                       address: str | None = None) -> tuple[dict, "_OpenStream | None"]:
        """Authenticate, authorize, run and audit one request; never raises for bad input."""
        started = time.perf_counter()
        anonymous = Principal(_local_who(uid) if transport == "local" else f"remote {address or '?'}",
                              "-", transport)
        cmd, args = "-", {}

        async def finish(principal: Principal, response: dict, result: str) -> tuple[dict, None]:
            failure = await self._audit_row(principal, cmd, args, result, time.perf_counter() - started,
                                            source=anonymous.who)
            if failure is None:
                return response, None
            # The request's own answer (its result, or its own error with its own code), flagged:
            # replacing it with an error would hide that a change ran (a task submitted on a full
            # disk was accepted; its id must reach the operator, or it is submitted again).
            return {**response, "audit_failure": failure}, None

        if transport == "local" and uid is not None and uid not in (os.geteuid(), 0):
            return await finish(anonymous, _error(f"uid {uid} is not this node's owner", EXIT_REFUSED),
                                "refused: not the owner")
        try:  # bounded cost whatever the bytes (admin_keys.check_shape)
            req = admin_keys.unpack_request(body)
        except MalformedError:  # a map with a repeated key: which one counts is ambiguous, run nothing
            return await finish(anonymous, _error("request has a map with a duplicate key", EXIT_USAGE),
                                "error: duplicate map key")
        except admin_keys.UnreadableRequest as exc:
            return await finish(anonymous, _error(f"request {exc}", EXIT_USAGE), f"error: request {exc}")
        if type(req) is not dict:
            return await finish(anonymous, _error("request must be a msgpack map", EXIT_USAGE), "error: not a map")
        if "signed" in req or "sig" in req:
            if self.verifier is None:
                return await finish(anonymous, _error("this node does not accept signed requests", EXIT_REFUSED),
                                    "refused: no key ring")
            try:
                claim = self.verifier.claim(req)  # key registered and active: before the costly check
                if len(claim.signed) > THREAD_VERIFY_BYTES:  # ~4 ms per MiB: off the event loop
                    signature_ok = await asyncio.to_thread(claim.signature_ok)
                else:
                    signature_ok = claim.signature_ok()
                signed = self.verifier.admit(claim, signature_ok, time.time_ns() // 1_000_000)
            except admin_keys.MalformedRequest as exc:
                principal = Principal(f"{exc.who} via {anonymous.who}", exc.role, transport)
                return await finish(principal, _error(str(exc), EXIT_USAGE), f"error: {exc}")
            except Refused as exc:
                principal = Principal(f"{exc.who} via {anonymous.who}", exc.role, transport)
                return await finish(principal, _error(f"refused: {exc}", EXIT_REFUSED), f"refused: {exc}")
            except Exception as exc:  # e.g. the store is busy: still one line, still audited
                return await finish(anonymous, _error(f"could not check the signature: {exc}", EXIT_FAIL),
                                    f"error: {exc}")
            principal = Principal(f"{signed.key.name} ({signed.key.fingerprint})", signed.key.role, transport,
                                  signed.key.fingerprint)
            cmd, args = signed.cmd, signed.args
        else:
            if transport != "local":
                return await finish(anonymous, _error("refused: remote requests must be signed by an admin key",
                                                      EXIT_REFUSED), "refused: unsigned remote request")
            principal = Principal(anonymous.who, "admin", transport)
            if type(req.get("cmd")) is not str:
                return await finish(principal, _error("request must be a map with a 'cmd' string", EXIT_USAGE),
                                    "error: no cmd")
            cmd, args = req["cmd"][:80], req.get("args", {})
            if type(args) is not dict:
                args = {"<not a map>": repr(args)[:80]}
                return await finish(principal, _error("'args' must be a map", EXIT_USAGE), "error: args not a map")
        handler, stream = self.handlers.get(cmd), self.streams.get(cmd)
        if handler is None and stream is None:
            known = ", ".join(sorted({*self.handlers, *self.streams}))
            msg = f"unknown command {cmd[:40]!r} (known: {known})"
            return await finish(principal, _error(msg, EXIT_USAGE), "error: unknown command")
        if not role_allows(principal.role, cmd):
            msg = f"refused: {cmd} needs role {required_role(cmd)}; {principal.who} is {principal.role}"
            return await finish(principal, _error(msg, EXIT_REFUSED), f"refused: needs {required_role(cmd)}")
        if stream is not None:
            if transport != "local":
                return await finish(principal, _error(f"{cmd} streams: use the local socket", EXIT_USAGE),
                                    "error: stream over remote")
            try:
                iterator = stream(args)
            except (ValueError, TypeError, KeyError, AdminError) as exc:
                return await finish(principal, _error(_bad_args(exc), getattr(exc, "code", EXIT_USAGE)),
                                    f"error: {_bad_args(exc)}")
            return {"ok": True, "result": {"stream": cmd}}, _OpenStream(principal, cmd, args, iterator)
        self._principal = principal
        try:
            result = await handler(args)
        except AdminError as exc:
            return await finish(principal, _error(str(exc), exc.code), f"error: {exc}")
        except AdminKeyError as exc:
            return await finish(principal, _error(str(exc), EXIT_USAGE), f"error: {exc}")
        except (ValueError, TypeError, KeyError, RemoteProtocolError) as exc:
            return await finish(principal, _error(_bad_args(exc), EXIT_USAGE), f"error: {_bad_args(exc)}")
        except OSError as exc:  # the machine's trouble (disk full, permissions), not a bug: one line
            msg = os_error_text(cmd, exc)
            log.error("admin command %s failed: %s", cmd, msg)
            return await finish(principal, _error(msg, EXIT_FAIL), f"error: {msg}")
        except Exception as exc:  # a bug in one handler must not take the API down
            log.exception("admin command %s failed", cmd)
            msg = f"internal error in {cmd}: {type(exc).__name__}: {exc}"
            return await finish(principal, _error(msg, EXIT_FAIL), f"error: {msg}")
        finally:
            self._principal = None
        try:
            data = msgpack.packb({"ok": True, "result": result}, use_bin_type=True)
        except (TypeError, ValueError) as exc:
            return await finish(principal, _error(f"{cmd} returned an unencodable result: {exc}", EXIT_FAIL),
                                "error: unencodable result")
        if len(data) > MAX_RESPONSE_BYTES:
            return await finish(principal, _error(f"{cmd}: response of {len(data)} bytes is too large; "
                                                  "ask for less (limit=...)", EXIT_FAIL), "error: response too large")
        return await finish(principal, {"ok": True, "result": result}, "ok")

    def _submit_row(self, principal: Principal, cmd: str, args: object, result: str, duration_s: float,
                    source: str | None):
        aggregate = source if (result.startswith("refused") or principal.role == "-") else None
        return self.audit.submit(at_ms=time.time_ns() // 1_000_000, who=principal.who,
                                 transport=principal.transport, role=principal.role, command=cmd,
                                 args=args, result=result, duration_s=duration_s, aggregate=aggregate)

    async def _audit_row(self, principal: Principal, cmd: str, args: object, result: str, duration_s: float,
                         source: str | None = None) -> str | None:
        """Append one audit row and wait (off the event loop's thread) until it is durable.

        A refusal, or a request refused or unreadable before anyone was authenticated (role
        ``-``), is aggregated per ``source`` (the connection: uid or remote address; never a
        claimed key, which the sender chooses); one counted into an open row returns at once.

        Returns:
            None once the row is durable (or counted, or there is no audit log); else why it
            is not: the store's error, or no commit within ``audit.DURABLE_WAIT_S`` seconds.
        """
        if self.audit is None:
            return None
        try:
            future = self._submit_row(principal, cmd, args, result, duration_s, source)
            if future is not None:
                await asyncio.wait_for(asyncio.wrap_future(future), audit_log.DURABLE_WAIT_S)
            return None
        except asyncio.TimeoutError:
            failure = f"no commit within {audit_log.DURABLE_WAIT_S:g} s"
        except Exception as exc:  # sqlite3.Error (disk full, I/O error, locked), AuditError
            failure = f"{type(exc).__name__}: {exc}"
        log.error("admin request %s by %s not recorded in the audit log: %s", cmd[:80], principal.who, failure)
        return failure

    def _audit_row_nowait(self, principal: Principal, cmd: str, args: object, result: str,
                          duration_s: float) -> None:
        """Queue one audit row without waiting for it (a stream's, after its last frame)."""
        if self.audit is None:
            return
        try:
            future = self._submit_row(principal, cmd, args, result, duration_s, None)
        except Exception:
            log.exception("could not append to the audit log")
            return
        if future is not None:
            future.add_done_callback(lambda f: f.exception() is not None and log.error(
                "admin stream %s by %s not recorded in the audit log: %s", cmd[:80], principal.who, f.exception()))

    # -------------------------------------------------------------- built-ins

    async def _commands(self, args: dict) -> list[dict]:
        out = []
        for name in sorted({*self.handlers, *self.streams}):
            fn = self.handlers.get(name) or self.streams.get(name)
            doc = (fn.__doc__ or "").strip().split("\n")[0]
            known_help, known_args = COMMAND_HELP.get(name, ("", ()))
            help_ = doc or known_help  # a handler's docstring wins; it may list its args in `admin_args`
            arg_names = tuple(getattr(fn, "admin_args", known_args))
            out.append({"name": name, "help": help_ or "(no help)", "args": list(arg_names),
                        "options": list(COMMAND_OPTIONS.get(name, ())),
                        "role": required_role(name), "stream": name in self.streams})
        return out

    async def _whoami(self, args: dict) -> dict:
        p = self._principal
        return {"who": p.who, "role": p.role, "transport": p.transport} if p else {}

    async def _audit(self, args: dict) -> list[dict]:
        future = self.audit.read(int_arg(args, "limit", 50, 1, 10_000))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), audit_log.DURABLE_WAIT_S)
        except asyncio.TimeoutError:
            raise AdminError(f"the audit log did not answer within {audit_log.DURABLE_WAIT_S:g} s") from None
        except sqlite3.Error as exc:
            raise AdminError(f"cannot read the audit log: {exc}") from None

    async def _key_add(self, args: dict) -> dict:
        key = self.keys.add(str_arg(args, "name", max_len=admin_keys.MAX_KEY_NAME_CHARS),
                            str_arg(args, "role", "observer", choices=admin_keys.ROLES),
                            bytes_arg(args, "public_key", max_len=1024), time.time_ns() // 1_000_000)
        return key.as_dict()

    async def _key_list(self, args: dict) -> list[dict]:
        return [k.as_dict() for k in self.keys.list()]

    async def _key_revoke(self, args: dict) -> dict:
        return self.keys.revoke(str_arg(args, "key", max_len=128), time.time_ns() // 1_000_000).as_dict()

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.audit is not None:  # every queued row and open refusal count, then the writer ends
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.audit.close()), audit_log.CLOSE_WAIT_S)
            except asyncio.TimeoutError:
                log.error("the audit log's writer did not finish within %g s: %d queued operations not written",
                          audit_log.CLOSE_WAIT_S, self.audit.pending)
            except Exception as exc:
                log.error("could not write the audit log's last rows: %s", exc)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


@dataclass
class _OpenStream:
    principal: Principal
    cmd: str
    args: dict
    iterator: AsyncIterator[dict]


def _bad_args(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"bad arguments: missing {exc.args[0]!r}" if exc.args else "bad arguments"
    if isinstance(exc, AdminError):
        return str(exc)
    return f"bad arguments: {exc}"


def _local_who(uid: int | None) -> str:
    return f"local-owner uid={os.geteuid() if uid is None else uid}"


def _peer_uid(sock: socket.socket | None) -> int | None:
    """The connecting process's uid (SO_PEERCRED, Linux); None where the platform lacks it."""
    if sock is None:
        return None
    if hasattr(socket, "SO_PEERCRED"):
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            return struct.unpack("3i", creds)[1]
        except OSError:
            return None
    return None


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("no extension types")


async def _write(writer: asyncio.StreamWriter, doc: dict) -> None:
    data = msgpack.packb(doc, use_bin_type=True)
    writer.write(struct.pack(">I", len(data)) + data)
    await writer.drain()


# ------------------------------------------------------------------ remote API


class RemoteAdminServer:
    """The remote admin API: a CURVE ROUTER (server key: the node's transport key).

    The CURVE handshake (ZAP via ``zmq.auth``, any client key) only encrypts
    and authenticates the server; each request must be signed by an admin key.
    """

    def __init__(self, endpoint: str, secret: bytes, public: bytes,
                 dispatch: Callable[..., Awaitable[tuple[dict, Any]]], *, counters: Counter | None = None) -> None:
        """``counters``: where ``zap_errors`` are counted (transport.serve_zap); the node's own
        (its ``status`` and metrics show them), or a fresh one for a server without a node."""
        self.endpoint = endpoint
        self.secret, self.public = secret, public
        self.dispatch = dispatch
        self.port = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._zap_task: asyncio.Task | None = None
        self.counters: Counter = Counter() if counters is None else counters  # zap_errors

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        # pyzmq's checks on a plain view of the same context, waited on by our own task
        # (transport.serve_zap: AsyncioAuthenticator removed its event-loop reader a loop turn
        # after stop(), which could take the reader of a server started in the meantime)
        self.auth = Authenticator(zmq.Context.shadow(self.ctx.underlying))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        self._zap_task = asyncio.get_running_loop().create_task(serve_zap(self.auth, self.counters),
                                                                name="remote-admin-zap")
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # a request is one frame of at most MAX_REQUEST_BYTES (+ room for CURVE's framing, which
        # libzmq counts); libzmq queues a few per connection (not 256 x 17 MiB): while they
        # wait, TCP pushes back on the sender
        router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES + 1024)
        router.setsockopt(zmq.SNDHWM, 16)
        router.setsockopt(zmq.RCVHWM, REMOTE_RCVHWM)
        router.curve_server = True
        router.curve_secretkey = self.secret
        router.curve_publickey = self.public
        router.zap_domain = b"chimera-admin"
        try:
            if self.endpoint.endswith(":0"):
                self.port = router.bind_to_random_port(self.endpoint.rsplit(":", 1)[0])
            else:
                router.bind(self.endpoint)
                self.port = int(self.endpoint.rsplit(":", 1)[1])
        except zmq.ZMQError as exc:
            router.close(linger=0)
            await _cancelled(self._zap_task)
            self.auth.stop()
            self.ctx.term()
            raise OSError(f"cannot listen for remote admin on {self.endpoint}: {exc}") from None
        self.router = router
        self._loop_task = asyncio.get_running_loop().create_task(self._recv_loop(), name="remote-admin")
        log.info("remote admin API on %s (CURVE server key %s; signed requests only)",
                 self.endpoint if self.port == 0 else f"{self.endpoint.rsplit(':', 1)[0]}:{self.port}",
                 fingerprint(self.public))

    async def _recv_loop(self) -> None:
        while True:
            try:
                frames = await self.router.recv_multipart(copy=False)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as exc:
                log.warning("remote admin receive error: %s", exc)
                await asyncio.sleep(0.05)
                continue
            ident = frames[0].bytes
            if len(frames) != 2:
                await self._reply(ident, _error("a request is exactly one frame", EXIT_USAGE))
                continue
            try:
                address = frames[1].get("Peer-Address")
            except (zmq.ZMQError, AttributeError):
                address = None
            if len(self._tasks) >= MAX_REMOTE_IN_FLIGHT:
                await self._reply(ident, _error("busy: too many requests in flight; retry", EXIT_FAIL))
                continue
            task = asyncio.get_running_loop().create_task(self._handle(ident, frames[1].bytes, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, ident: bytes, body: bytes, address: str | None) -> None:
        try:
            response, _ = await self.dispatch(body, "remote", address=address)
        except Exception as exc:
            log.exception("remote admin dispatch failed")
            response = _error(f"internal error: {type(exc).__name__}", EXIT_FAIL)
        await self._reply(ident, response)

    async def _reply(self, ident: bytes, response: dict) -> None:
        try:
            await self.router.send_multipart([ident, msgpack.packb(response, use_bin_type=True)],
                                             flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("remote admin reply dropped: %s", exc)

    async def close(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self.router.close(linger=0)
        await _cancelled(self._zap_task)  # its reader is removed before the ZAP socket closes
        self.auth.stop()
        self.ctx.term()


async def _cancelled(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass


# --------------------------------------------------------------------- clients


def node_fingerprint_of(data_dir: Path) -> str:
    """The transport-key fingerprint (signed requests' audience) of the node in ``data_dir``.

    Raises:
        AdminError: the key file is missing or unreadable.
    """
    from .keys import TRANSPORT_FILE, TransportKeys

    try:
        secret = (data_dir / TRANSPORT_FILE).read_bytes()
        return fingerprint(TransportKeys(secret).public)
    except (OSError, ValueError) as exc:
        raise AdminError(f"cannot read {data_dir / TRANSPORT_FILE}: {exc}", EXIT_NO_NODE) from None


class LocalClient:
    """Blocking client of the Unix socket; signs requests when given an admin key."""

    def __init__(self, path: Path, key=None, timeout_s: float = 10.0) -> None:
        self.path = path
        self.key = key
        self.timeout_s = timeout_s
        self.audience = node_fingerprint_of(path.parent) if key is not None else ""
        self.target = str(path.parent if path.name == SOCKET_NAME else path)

    def _request(self, cmd: str, args: dict) -> bytes:
        if self.key is not None:
            req = admin_keys.sign_request(self.key, self.audience, cmd, args)
        else:
            req = {"cmd": cmd, "args": args}
        return msgpack.packb(req, use_bin_type=True)

    def _connect(self, timeout_s: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if not self.path.parent.is_dir():  # a typo in --data-dir reads differently from a stopped node
                raise AdminError(f"no node is running with data dir {self.target}: there is no such "
                                 "directory", EXIT_NO_NODE) from None
            raise AdminError(f"no node is running with data dir {self.target}", EXIT_NO_NODE) from None
        except PermissionError:
            sock.close()
            raise AdminError(f"not allowed to open {self.path} (run as the node's user)", EXIT_REFUSED) from None
        except OSError as exc:
            sock.close()
            raise AdminError(f"cannot connect to {self.path}: {exc}", EXIT_NO_NODE) from None
        return sock

    def send_raw(self, data: bytes, timeout_s: float | None = None) -> dict:
        """Send an already-encoded request body; return the response map (no raise on ok=false)."""
        t = self.timeout_s if timeout_s is None else timeout_s
        sock = self._connect(t)
        try:
            sock.sendall(struct.pack(">I", len(data)) + data)
            return _read_frame(sock)
        except socket.timeout:
            raise AdminError(f"node did not answer within {t} s", EXIT_NO_NODE) from None
        finally:
            sock.close()

    def call(self, cmd: str, args: dict | None = None, timeout_s: float | None = None) -> Any:
        """Run one command. Raises AdminError (with the node's code) on failure."""
        return _result(self.send_raw(self._request(cmd, args or {}), timeout_s))

    def follow(self, cmd: str, args: dict | None = None) -> Iterator[dict]:
        """Run a streaming command; yields records until the node ends it (close to stop)."""
        sock = self._connect(self.timeout_s)
        try:
            data = self._request(cmd, args or {})
            sock.sendall(struct.pack(">I", len(data)) + data)
            _result(_read_frame(sock))
            sock.settimeout(None)
            while True:
                frame = _read_frame(sock)
                if "event" in frame:
                    yield frame["event"]
                else:
                    return
        except socket.timeout:
            raise AdminError(f"node did not answer within {self.timeout_s} s", EXIT_NO_NODE) from None
        finally:
            sock.close()


class RemoteClient:
    """Blocking client of a node's remote admin API (CURVE; every request signed).

    Args:
        endpoint: ``tcp://HOST:PORT``.
        server_key: the node's raw 32-byte transport public key.
        key: the admin private key (Ed25519).
    """

    def __init__(self, endpoint: str, server_key: bytes, key, timeout_s: float = 10.0) -> None:
        if not tcp_endpoint_port(endpoint):  # None (malformed) or 0 (no port to dial)
            raise AdminError(f"bad endpoint {endpoint[:80]}: use tcp://HOST:PORT (port 1..65535)", EXIT_USAGE)
        self.endpoint = endpoint
        self.server_key = server_key
        self.key = key
        self.timeout_s = timeout_s
        self.audience = fingerprint(server_key)
        self.target = endpoint

    def send_raw(self, data: bytes, timeout_s: float | None = None) -> dict:
        t = self.timeout_s if timeout_s is None else timeout_s
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = z85.encode(self.server_key)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_RESPONSE_BYTES + 1024)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                raise AdminError(f"bad endpoint {self.endpoint}: {exc}", EXIT_USAGE) from None
            sock.send(data)
            if not sock.poll(int(t * 1000), zmq.POLLIN):
                raise AdminError(f"no answer from {self.endpoint} within {t} s (node down, or wrong "
                                 "address or server key?)", EXIT_NO_NODE)
            try:
                doc = msgpack.unpackb(sock.recv(), raw=False)
            except Exception:
                raise AdminError("the node sent an unreadable response", EXIT_FAIL) from None
            if type(doc) is not dict:
                raise AdminError("the node sent an unreadable response", EXIT_FAIL)
            return doc
        finally:
            sock.close(linger=0)
            ctx.term()

    def call(self, cmd: str, args: dict | None = None, timeout_s: float | None = None) -> Any:
        req = admin_keys.sign_request(self.key, self.audience, cmd, args or {})
        return _result(self.send_raw(msgpack.packb(req, use_bin_type=True), timeout_s))

    def follow(self, cmd: str, args: dict | None = None) -> Iterator[dict]:
        raise AdminError(f"{cmd} streams and is served on the local socket only", EXIT_USAGE)


_audit_warned: set[str] = set()  # reasons this process has warned about (once each)
_audit_noted: list[str] = []  # reasons since the last take_audit_failures(), in order, distinct


def _result(reply: dict) -> Any:
    """The result of one reply; raises AdminError for an error reply.

    A reply whose audit row the node could not write (``audit_failure``, PROTOCOL §19.6) is
    still its command's own answer: the reason is noted for :func:`take_audit_failures` and
    warned about on stderr, once per distinct reason in this process (a CLI command makes
    several calls; a full disk fails them all the same way)."""
    if "audit_failure" in reply:
        reason = printable(str(reply["audit_failure"]))[:300]
        if reason not in _audit_noted:
            _audit_noted.append(reason)
        if reason not in _audit_warned:
            _audit_warned.add(reason)
            print(f"warning: the node could not record this request in its audit log: {reason}",
                  file=sys.stderr)
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error", "unknown error")), int(reply.get("code", EXIT_FAIL)))
    return reply.get("result")


def take_audit_failures() -> str | None:
    """The ``audit_failure`` reasons of the replies read since the last call (``; ``-joined,
    distinct), or None; forgets them. ``--json`` printers put it in their document."""
    if not _audit_noted:
        return None
    reasons = "; ".join(_audit_noted)
    _audit_noted.clear()
    return reasons


def _read_frame(sock: socket.socket) -> dict:
    (size,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if size > MAX_RESPONSE_BYTES:
        raise AdminError("response too large", EXIT_FAIL)
    try:
        doc = msgpack.unpackb(_recv_exactly(sock, size), raw=False)
    except Exception:
        raise AdminError("the node sent an unreadable response", EXIT_FAIL) from None
    if type(doc) is not dict:
        raise AdminError("the node sent an unreadable response", EXIT_FAIL)
    return doc


def call(data_dir: Path, cmd: str, args: dict | None = None, timeout_s: float = 10.0) -> Any:
    """Blocking client: send one command to the node in ``data_dir`` as its owner.

    Raises:
        AdminError: no node is running there, it timed out, or it answered an error.
    """
    return LocalClient(data_dir / SOCKET_NAME, timeout_s=timeout_s).call(cmd, args)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AdminError("node closed the connection", EXIT_NO_NODE)
        buf += chunk
    return bytes(buf)
