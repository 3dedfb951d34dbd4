"""One warning per distinct message, whatever the thread: resfuse's rule for every fallback and refusal it
reports (a configuration that runs unfused, a candidate auto could not run, a configuration cuDNN refused)."""
from __future__ import annotations

import threading
import warnings

_seen: set = set()
_lock = threading.Lock()


def warn_once(message: str, category: type = UserWarning, stacklevel: int = 3) -> None:
    with _lock:
        if message in _seen:
            return
        _seen.add(message)
    warnings.warn(message, category, stacklevel=stacklevel)


def forget_warnings() -> None:
    """Warn again about everything (tests)."""
    with _lock:
        _seen.clear()
