"""Schemathesis hooks for scripts/schemathesis.sh.

Long-polls are the one thing a fuzzer must not take literally: a valid
`wait` of 1e178 seconds is clamped by the server to its cap (60 s at least,
API.md), so every such case would hold a connection for a minute and the
run would blow its time budget (or time out: a "network error").

So every *valid* wait (a finite, non-negative number: in the query string,
the claim body or `Prefer: wait=N`) is shortened to at most MAX_WAIT seconds
before the call. Invalid ones (negative, NaN, text, wrong types) are sent
as generated: refusing them with a 400 problem is what is being tested.
The unit and HTTP proptests in crates/server cover large waits themselves.
"""

import math
import re

import schemathesis

MAX_WAIT = 0.2


def _short(value):
    """`value` if it is not a valid wait (keep testing the refusal), else
    the same wait clamped to MAX_WAIT, in the same JSON/text type."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return value
        return MAX_WAIT if value > MAX_WAIT else value
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        if math.isfinite(f) and f > MAX_WAIT:
            return str(MAX_WAIT)
        return value
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


_PREFER_WAIT = re.compile(r"(?i)(\bwait\s*=\s*\"?)([0-9][0-9.eE+]*)")


def _short_prefer(header):
    """`Prefer: wait=N` takes whole seconds: clamp N to at most 1."""
    if not isinstance(header, str):
        return header

    def clamp(m):
        try:
            n = float(m.group(2))
        except ValueError:
            return m.group(0)
        return m.group(1) + ("1" if math.isfinite(n) and n > 1 else m.group(2))

    return _PREFER_WAIT.sub(clamp, header)


@schemathesis.hook
def before_call(context, case, kwargs):
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = _short(case.query["wait"])
    if isinstance(case.body, dict) and "wait" in case.body:
        case.body["wait"] = _short(case.body["wait"])
    if isinstance(case.headers, dict):
        for name in list(case.headers):
            if name.lower() == "prefer":
                case.headers[name] = _short_prefer(case.headers[name])
