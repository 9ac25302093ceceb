"""Error reasons fit to leave a hospital: what a site's failure may tell the server.

A ClientApp's exception text becomes the error reply's reason, which the server logs and
writes into the run directory; the site keeps the full error in its own log. Used by the
client when it replies and by the server when it records reasons.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ERROR_REASON", "redact_error_reason"]


_TRACEBACK_HEAD = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s*File "[^"]*", line \d+')
_POSIX_PATH = re.compile(r"(?<![\w.~<>-])~?(?:/[\w.@+%-]+){2,}/?")
"""An absolute (or ``~``) path of two or more components; relative names (``../../x``) are echoed as sent."""
_WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\[^\s'\"<>|]+")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = re.compile(r"^\s*(?:\^+\s*|The above exception was the direct cause of the following exception:\s*|"
                    r"During handling of the above exception, another exception occurred:\s*|"
                    r"ray::\S+ \(pid=.*\)\s*)$")
"""Lines that say nothing about the error: caret markers, chained-exception banners, Ray's actor header."""
MAX_ERROR_REASON = 400
"""Characters of an error reason kept: one clear sentence, never a dump."""


def _without_tracebacks(text: str) -> list[str]:
    """Lines of ``text`` without traceback blocks (the header and its indented frame lines) or frame lines.

    The exception line that ends a traceback (``ValueError: ...``) is not indented and is kept,
    so a message wrapped in a traceback (Ray's) survives.
    """
    kept: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if _TRACEBACK_HEAD in line:
            before = line.split(_TRACEBACK_HEAD, 1)[0]
            if before.strip():
                kept.append(before)
            in_traceback = True
            continue
        if in_traceback and (not line.strip() or line[:1].isspace()):
            continue
        in_traceback = False
        if _NOISE.match(line):
            continue
        if _FRAME.match(line):  # a frame outside a traceback block (Ray prints them first): skip its code line too
            in_traceback = True
            continue
        kept.append(line)
    return kept


def redact_error_reason(reason: str, max_chars: int = MAX_ERROR_REASON) -> str:
    """An error reason fit to leave a hospital: no traceback, no local paths or IPs, bounded length.

    A ClientApp's exception text becomes the error reply's reason, which the server logs and
    writes to ``metrics.json``. Python tracebacks (and Ray's wrapped ones) show the site's file
    system and code; paths in a message (``/data/ham10000/images/ISIC_0024306.jpg``) name its
    layout. Both stay in the site's own log; what is sent keeps the exception type and the
    message with every absolute path replaced by ``<path>`` (IPv4 addresses by ``<ip>``).

    >>> redact_error_reason('site-2: SiteDataError: cannot read /data/ham/x.jpg (truncated)')
    'site-2: SiteDataError: cannot read <path> (truncated)'
    >>> redact_error_reason('boom\\nTraceback (most recent call last):\\n  File "/srv/a.py", line 3, in f\\n    f()\\nValueError: x')
    'boom ValueError: x'
    """
    text = "\n".join(_without_tracebacks(_ANSI.sub("", str(reason))))
    text = _WINDOWS_PATH.sub("<path>", _POSIX_PATH.sub("<path>", text))
    text = _IPV4.sub("<ip>", text)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if len(text) <= max_chars:
        return text
    # keep the head (who failed: "node 7 (site-2): ...") and the tail (a wrapped error ends with the cause)
    head = max_chars // 3
    return text[:head] + " ... " + text[-(max_chars - head - 5):]
