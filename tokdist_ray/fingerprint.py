"""One way to hash settings: cache keys, stage keys and run manifests all use it."""

from __future__ import annotations

import hashlib
import json


def fingerprint(value, length: int = 16) -> str:
    """A stable hex digest of any JSON-able value (key order ignored; other objects by str)."""
    blob = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]
