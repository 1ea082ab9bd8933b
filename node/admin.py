"""Local control API on a Unix socket (``DATA_DIR/admin.sock``, mode 0600).

Framing: 4-byte big-endian length, then a msgpack map. Request:
``{"cmd": str, "args": map}``; response: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": str}``. Requests are records dispatched by name, never
evaluated. Only the node's own user can open the socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack

from chimera.protocol.errors import RemoteProtocolError

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
SOCKET_NAME = "admin.sock"


class AdminError(Exception):
    """The node answered with an error, or could not be reached."""


Handler = Callable[[dict], Awaitable[Any]]


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_socket():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        self.path.chmod(0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    header = await reader.readexactly(4)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                (size,) = struct.unpack(">I", header)
                if size > MAX_REQUEST_BYTES:
                    await _write(writer, {"ok": False, "error": "request too large"})
                    return
                body = await reader.readexactly(size)
                await _write(writer, await self._dispatch(body))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, body: bytes) -> dict:
        try:
            req = msgpack.unpackb(body, raw=False, ext_hook=_no_ext, strict_map_key=True)
        except Exception:
            return {"ok": False, "error": "request is not msgpack"}
        if type(req) is not dict or type(req.get("cmd")) is not str:
            return {"ok": False, "error": "request must be a map with a 'cmd' string"}
        args = req.get("args", {})
        if type(args) is not dict:
            return {"ok": False, "error": "'args' must be a map"}
        handler = self.handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd'][:40]!r}; "
                                          f"known: {', '.join(sorted(self.handlers))}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except AdminError as exc:
            return {"ok": False, "error": str(exc)}
        except (ValueError, TypeError, KeyError, RemoteProtocolError) as exc:
            return {"ok": False, "error": f"bad arguments: {exc}"}

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("no extension types")


async def _write(writer: asyncio.StreamWriter, doc: dict) -> None:
    data = msgpack.packb(doc, use_bin_type=True)
    writer.write(struct.pack(">I", len(data)) + data)
    await writer.drain()


def call(data_dir: Path, cmd: str, args: dict | None = None, timeout_s: float = 10.0) -> Any:
    """Blocking client: send one command to the node in ``data_dir``.

    Raises:
        AdminError: no node is running there, it timed out, or it answered an error.
    """
    path = data_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AdminError(f"no node is running with data dir {data_dir}") from None
        except PermissionError:
            raise AdminError(f"not allowed to open {path} (run as the node's user)") from None
        data = msgpack.packb({"cmd": cmd, "args": args or {}}, use_bin_type=True)
        sock.sendall(struct.pack(">I", len(data)) + data)
        header = _recv_exactly(sock, 4)
        (size,) = struct.unpack(">I", header)
        if size > MAX_RESPONSE_BYTES:
            raise AdminError("response too large")
        reply = msgpack.unpackb(_recv_exactly(sock, size), raw=False)
    except socket.timeout:
        raise AdminError(f"node did not answer within {timeout_s} s") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise AdminError(reply.get("error", "unknown error"))
    return reply.get("result")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AdminError("node closed the connection")
        buf += chunk
    return bytes(buf)
