"""Where a `--model-name-or-path` points, and the one way minitrain loads a tokenizer from it.

Every stage that reads a model or a tokenizer from a user's path (tokenize, inspect, train's preflight and
each rank) goes through `resolve_model_path`, so a typo gets the same one-line answer everywhere, fast:

1. an existing folder is used as it is;
2. a name that can only be a path (`/...`, `./...`, `~/...`, more than one `/`, characters no Hub id has)
   and does not exist: "no such folder";
3. otherwise the Hub is asked only when offline mode (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE`) is off, with
   one try of at most `HUB_TIMEOUT_S` seconds in all and no retries: first a plain TCP connection to the
   Hub's host (or the proxy's), then, only if that opens, one HEAD request; a repository it has is returned
   as the id, for transformers to download what the cache lacks;
4. a Hub id (`name` or `org/name`) in the local Hugging Face cache that the Hub was not asked about (offline)
   or did not confirm (unreachable, private): its cached snapshot folder, read with no network at all;
5. anything else is one line: no such folder, and offline, unreachable, or unknown to the Hub.

Trade-off: a slow but working connection that needs more than `HUB_TIMEOUT_S` to answer is reported as
unreachable; the fix the message names (download the model once, pass its folder) always works, while the
retries it replaces cost 30-56 s on every typo. The connection probe uses only the standard library, in a
daemon thread the caller stops waiting for at the deadline (a DNS lookup has no timeout of its own), so
an unreachable Hub costs neither huggingface_hub's HTTP client import (about 0.4 s) nor a hung resolver.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from minitrain.errors import UserError, first_line

HUB_TIMEOUT_S = 1.0  # the whole try: connection probe and request
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*")  # tokenizer.json, spiece.model, vocab.json ...
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
_FIX = "check the spelling, or pass a local model folder"


def offline_mode() -> str | None:
    """The variable that turns the Hub off (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1), or None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true"):
            return name
    return None


def _connects(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host (or to the proxy the environment names for it) opens within
    `timeout` seconds, DNS lookup included."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except (OSError, ValueError):  # DNS failure, refused, unreachable network, timeout, a bad port
            pass

    thread = threading.Thread(target=connect, name="minitrain-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)  # a lookup that hangs past the deadline is left behind (daemon: exit does not wait)
    return bool(opened)


def ask_hub(repo_id: str) -> bool | None:
    """One try, no retries: True if the Hub has this model, False if not, None if it cannot be reached."""
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/models/{repo_id}"
    deadline = time.monotonic() + HUB_TIMEOUT_S
    if not _connects(url, HUB_TIMEOUT_S):
        return None
    from huggingface_hub import get_session  # the HTTP client (httpx): imported only for a reachable Hub
    from huggingface_hub.utils import build_hf_headers

    try:
        response = get_session().head(
            url,
            headers=build_hf_headers(),
            timeout=max(deadline - time.monotonic(), 0.1),
            follow_redirects=True,
        )
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, proxy) means unreachable
        return None
    if response.status_code in (401, 403, 404):  # the Hub answers 401 for a name it does not know
        return False
    return True if response.status_code < 400 else None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of this model (its `main` revision), or None.

    Reads the cache's documented layout (models--ORG--NAME/refs/main names snapshots/HASH) directly: no
    network, and no import of huggingface_hub's client (about half a second) on the way to a typo's answer.
    """
    from huggingface_hub import constants

    entry = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    try:
        snapshot = entry / "snapshots" / (entry / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return snapshot if snapshot.is_dir() else None


def resolve_model_path(name: str | Path, what: str = "--model-name-or-path") -> str:
    """The folder, or a Hub id the Hub confirmed, for transformers to load from; one-line UserError otherwise.

    `what` names the source in the message (the flag, or the sidecar the name was read from).
    """
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"{what} {name}: a file, not a folder; pass the model's folder (with config.json)")
    path_like = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if path_like or not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise UserError(f"{what} {name}: no such folder; check the path, or pass a Hub id such as org/name")
    snapshot = _cached_snapshot(name)
    variable = offline_mode()
    if snapshot is not None and variable is not None:
        return str(snapshot)
    if variable is not None:
        raise UserError(
            f"{what} {name}: no such folder, and not in the local Hugging Face cache (offline mode: "
            f"{variable}={os.environ[variable]}, so the Hub is not asked); {_FIX}"
        )
    found = ask_hub(name)
    if snapshot is not None:  # a partly cached model (config only, say) gets its other files from the Hub
        return name if found else str(snapshot)
    if found is None:
        raise UserError(
            f"{what} {name}: no such folder, not in the local Hugging Face cache, and the Hub cannot be "
            f"reached (one try, {HUB_TIMEOUT_S:.0f} s); {_FIX}"
        )
    if not found:
        raise UserError(
            f"{what} {name}: no such folder, and the Hub has no model named {name} (a private one needs "
            f"`hf auth login`); {_FIX}"
        )
    return name


def load_tokenizer(
    name: str | Path, what: str = "--model-name-or-path", *, trust_remote_code: bool = False
) -> Any:
    """A transformers tokenizer from a folder or Hub id, resolved as above; any failure is one UserError
    line. `trust_remote_code` (--trust-remote-code) lets a repository's own tokenizer class run."""
    source = resolve_model_path(name, what)
    folder = Path(source)
    if folder.is_dir() and not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise UserError(
            f"cannot load a tokenizer from {name}: the folder has no tokenizer.json; pass the folder "
            "of the model's tokenizer"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError, ValueError, ... for a missing or broken tokenizer
        if "custom code" in str(err) and not trust_remote_code:
            raise UserError(
                f"cannot load a tokenizer from {name}: it ships its own tokenizer code; add "
                "--trust-remote-code if you trust that repository"
            ) from None
        raise UserError(
            f"cannot load a tokenizer from {name} ({type(err).__name__}: {first_line(err)}); "
            "pass a local tokenizer or model folder"
        ) from None
