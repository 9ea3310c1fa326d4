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

Loading without torch. `AutoTokenizer.from_pretrained` imports torch (transformers' tokenization_auto ->
configuration_auto -> configuration_utils -> modeling_rope_utils), about 2-3.5 CPU-s of a `minitrain
tokenize` start-up that never needs torch. `load_tokenizer` therefore calls the tokenizer class itself where
transformers 5.x's `AutoTokenizer.from_pretrained` provably picks that class without looking at anything a
file read cannot tell, and with the same arguments (`_from_auto=True`, revision None, so an identical load);
every other case goes to `AutoTokenizer` unchanged. The fast path needs all of (`fast_tokenizer_class`):

- a local folder (a Hub id's files and revision are AutoTokenizer's business);
- no `config.json` in it: AutoTokenizer then decides on an empty config (model type "", no name), so the
  model-type overrides (a Hub class registered as wrong for the model type, Mistral's tekken, a model id
  forced to TokenizersBackend, the per-model-type mapping) cannot apply. Reading a config's `model_type`
  would need transformers' model-type tables, which live in the module that imports torch; so a model
  folder with config.json takes the slow path. Trade-off: exact always, fast for tokenizer folders only;
- a `tokenizer_config.json` holding an object with a `tokenizer_class` string and no `auto_map` (remote
  code is decided by AutoTokenizer and --trust-remote-code);
- that class name (its `Fast` suffix dropped, then with `Fast` added, as AutoTokenizer tries them) exported
  by transformers as a real tokenizer class of transformers' own, and none of the names AutoTokenizer
  rewrites: `Bloom*` (-> TokenizersBackend), `MistralCommonBackend` (mistral-common's probe); `PythonBackend`
  (`PreTrainedTokenizer`) becomes `TokenizersBackend` exactly as AutoTokenizer does. A name transformers
  lacks (AutoTokenizer falls back to TokenizersBackend) takes the slow path;
- not the ByteLevel override: a declared `LlamaTokenizer` whose tokenizer.json is ByteLevel (AutoTokenizer
  loads TokenizersBackend then) takes the slow path; transformers' own check decides, on the file.

Nothing is registered in minitrain's process (`AutoTokenizer.register`), so transformers' name lookup and
its top-level export name the same class; tests/data/test_tokenizer.py proves that for every class name
transformers maps, and the same class, fingerprint, ids and rendered template for every fixture.
"""

from __future__ import annotations

import json
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


_REWRITTEN_BY_AUTO = ("BloomTokenizer", "MistralCommonBackend")  # AutoTokenizer decides these itself


def fast_tokenizer_class(source: str) -> type | None:
    """The tokenizer class `AutoTokenizer.from_pretrained(source)` would load, when the module docstring's
    conditions prove it from the files alone (no torch); None where AutoTokenizer must decide."""
    folder = Path(source)
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or broken: AutoTokenizer's path (and its error message)
        return None
    if not isinstance(config, dict) or "auto_map" in config:
        return None
    declared = config.get("tokenizer_class")
    if not isinstance(declared, str) or not declared:
        return None
    import transformers
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    name = declared.removesuffix("Fast")
    if name in _REWRITTEN_BY_AUTO:
        return None
    try:  # transformers' lazy module imports the class's module here
        found = getattr(transformers, name, None) or getattr(transformers, name + "Fast", None)
    except Exception:  # noqa: BLE001 - a class whose module fails to import: AutoTokenizer's path decides
        return None
    if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
        return None  # not transformers' (AutoTokenizer would use TokenizersBackend), or a missing backend
    if not found.__module__.startswith("transformers.") or found.__name__ in _REWRITTEN_BY_AUTO:
        return None
    if found.__name__ == "PythonBackend":  # AutoTokenizer's own rewrite of the pure-Python base
        found = transformers.TokenizersBackend
    if name == "LlamaTokenizer" and transformers.TokenizersBackend._tokenizer_json_has_byte_level(source):
        return None  # AutoTokenizer's ByteLevel override (Llama-3-style vocabulary declared as Llama)
    return found


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
    try:
        fast = fast_tokenizer_class(source)
        if fast is not None:  # the class AutoTokenizer would pick, loaded as it would load it: no torch
            return fast.from_pretrained(source, _from_auto=True, revision=None)
        from transformers import AutoTokenizer

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
