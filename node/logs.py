"""Logging: readable lines on a terminal, one JSON object per line when asked."""

from __future__ import annotations

import json
import logging
import sys
import time


def local_time_text(at_ms: int) -> str:
    """``at_ms`` (ms since the epoch) as local time with its UTC offset, to the second:
    ``2026-12-02 07:24:15 +0000`` (what every table and event line of the CLI and shell shows)."""
    moment = time.localtime(at_ms / 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S %z", moment)


def printable(text: str) -> str:
    """``text`` safe to print on an operator's terminal: every character that is not
    printable (control characters such as ESC or newline, format characters such as the
    bidi overrides, separators other than the space) written as its ``\\x..``/``\\u..``
    escape, so text from peers (committed decisions, event fields) cannot forge lines or
    send terminal control sequences."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("peer_id", "event", "reason"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


def setup_logging(level: str = "info", json_lines: bool = False, prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter(f"%(asctime)s.%(msecs)03d {prefix}%(levelname)-7s %(name)s: %(message)s",
                                datefmt="%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("zeroconf").setLevel(logging.WARNING)


class DropLog:
    """Counts every drop by reason and logs at most once per (peer, reason) per interval."""

    def __init__(self, counters, interval_s: float, logger: logging.Logger) -> None:
        self.counters = counters
        self.interval_s = interval_s
        self.log = logger
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def record(self, reason: str, peer: str, detail: str, now: float) -> None:
        self.counters[f"drop_{reason}"] += 1
        key = (peer, reason)
        last = self._last.get(key)
        if last is None or now - last[0] >= self.interval_s:
            suppressed = 0 if last is None else last[1]
            extra = f" ({suppressed} more since last report)" if suppressed else ""
            self.log.warning("dropped envelope from %s: %s: %s%s", peer, reason, detail, extra,
                             extra={"peer_id": peer, "reason": reason})
            self._last[key] = (now, 0)
            if len(self._last) > 10000:
                self._last.clear()
        else:
            self._last[key] = (last[0], last[1] + 1)
