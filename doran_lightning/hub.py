"""The Hugging Face hub: weights and files download and cache as timm / transformers / datasets always do when the
hub answers; when it does not, the libraries are held to their cache, so a missing file fails in seconds.

Unreachable, the libraries retry each file for about a minute (huggingface_hub's "Retrying in Ns" lines) before
failing. `cache_only_when_offline` asks the endpoint once (a TCP connect with a short timeout; DNS runs in a
thread, as it has no timeout of its own) and, without an answer, switches the libraries to offline mode for the
block: cached files load, missing ones fail at once and the caller's message names the flag to set. With
``HF_HUB_OFFLINE=1`` nothing is asked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0  # a TCP connect to the hub takes well under a second where there is a network
ANSWER_KEPT_S = 60.0
_answers: dict[tuple[str, float], tuple[bool, float]] = {}
_DEFAULT_ENDPOINT = "https://huggingface.co"


def endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", _DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: the libraries read only their cache."""
    import huggingface_hub.constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host accepts a connection within ``timeout`` seconds (False in offline mode).

    An answer is reused for `ANSWER_KEPT_S` (one command asks for a config, weights and a tokenizer in turn).
    """
    if offline():
        return False
    key = (endpoint(), timeout)
    kept = _answers.get(key)
    if kept is not None and time.monotonic() - kept[1] < ANSWER_KEPT_S:
        return kept[0]
    answer = _connects(endpoint(), timeout)
    _answers[key] = (answer, time.monotonic())
    return answer


def _connects(url: str, timeout: float) -> bool:
    address = urlparse(url)
    host = address.hostname or "huggingface.co"
    port = address.port or (80 if address.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextlib.contextmanager
def cache_only_when_offline() -> Iterator[bool]:
    """Hold the hub libraries to their cache while the hub is unreachable; yields whether it is reachable."""
    import huggingface_hub.constants as hub_constants

    reachable = hub_reachable()
    datasets_config = _datasets_config()
    saved = (hub_constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None))
    if not reachable:
        hub_constants.HF_HUB_OFFLINE = True
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = True
    try:
        yield reachable
    finally:
        hub_constants.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]


def _datasets_config():
    try:
        import datasets.config
    except ImportError:
        return None
    return datasets.config


def unreachable_note(reachable: bool) -> str:
    """What to add to a loading error when the hub did not answer ('' when it did)."""
    if reachable:
        return ""
    if offline_by_user():
        return " (HF_HUB_OFFLINE is set: only the cache is read)"
    return (f" (the hub at {endpoint()} did not answer within {PROBE_TIMEOUT_S:g} s, so only the cache was read; "
            "with a network the weights download and are cached)")


def offline_by_user() -> bool:
    """The user's environment asks for offline mode (not our own switch inside `cache_only_when_offline`)."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
