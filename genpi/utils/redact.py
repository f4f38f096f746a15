"""Credentials out of what genpi prints or saves: a URL's ``user:password@`` part is masked.

A ``base_url`` such as ``http://user:secret@host/v1`` is a legitimate way to reach a server behind basic auth;
the secret must still never reach a log line, an error message, ``run.json`` or a data card.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://userinfo@ : userinfo is everything up to the last '@' before the host's first '/'
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# ?api_key=... / &token=... in a query string
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:api[_-]?key|key|token|access_token|secret|password)=)[^&\s#]+",
                           re.IGNORECASE)
MASK = "***"


def mask_url(text: Any) -> str:
    """``text`` with any URL credential replaced by ``***`` (user names are masked too: they can be tokens)."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", out)


def mask_tree(value: Any) -> Any:
    """A config tree (dicts, lists, strings) with every string passed through :func:`mask_url`."""
    if isinstance(value, dict):
        return {k: mask_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_tree(v) for v in value]
    return mask_url(value) if isinstance(value, str) else value
