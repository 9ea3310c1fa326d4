"""minitrain/data/tokenizer.py: where a model path points (folder, cached Hub id, one Hub request) and the
loader.

The Hub is never reached from a test: `ask_hub` is replaced by a stub that counts its calls, except in the
tests that point it at a local address: a closed port (unreachable), a resolver that never answers (the
deadline still holds), and a small local HTTP server that answers as the Hub does (404, 401, 200).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minitrain.data import tokenizer as tk
from minitrain.errors import UserError
from tests.conftest import DATA, SMOLLM2, TOKENIZERS

CACHED_SNAPSHOT = tk._cached_snapshot  # kept before the `hub` fixture replaces it


@pytest.fixture
def hub(monkeypatch):
    """Offline mode off, an empty Hugging Face cache, and a Hub stub: set `.answer`, read `.asked`."""

    class Hub:
        answer: bool | None = None
        asked: list[str] = []

    stub = Hub()
    stub.asked = []

    def ask(repo_id: str) -> bool | None:
        stub.asked.append(repo_id)
        return stub.answer

    for variable in tk.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(tk, "ask_hub", ask)
    monkeypatch.setattr(tk, "_cached_snapshot", lambda repo_id: None)
    return stub


def test_an_existing_folder_is_used_as_it_is(tmp_path: Path, hub):
    assert tk.resolve_model_path(tmp_path) == str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"config.json: a file, not a folder"):
        tk.resolve_model_path(tmp_path / "config.json")
    assert hub.asked == []


@pytest.mark.parametrize(
    "typo", ["./mymdoel", "../mymodel", "/no/such/model", "~/no-such-model", "a/b/c", "my model"]
)
def test_a_path_that_does_not_exist_is_refused_without_asking_the_hub(typo: str, hub):
    hub.answer = True  # even a Hub that would say yes is not asked: these can only be paths
    with pytest.raises(UserError) as err:
        tk.resolve_model_path(typo)
    assert str(err.value) == (
        f"--model-name-or-path {typo}: no such folder; check the path, or pass a Hub id such as org/name"
    )
    assert hub.asked == []


@pytest.mark.parametrize("variable", tk.OFFLINE_VARIABLES)
@pytest.mark.parametrize("name", ["mymodel", "org/typo"])
def test_offline_mode_refuses_an_uncached_hub_id_without_asking(name: str, variable: str, hub, monkeypatch):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(UserError) as err:
        tk.resolve_model_path(name)
    message = str(err.value)
    assert message.startswith(
        f"--model-name-or-path {name}: no such folder, and not in the local Hugging Face"
    )
    assert f"offline mode: {variable}=1" in message and message.endswith("or pass a local model folder")
    assert hub.asked == []


def test_online_but_unreachable_hub_is_asked_once_and_answers_in_one_line(hub):
    hub.answer = None  # what ask_hub returns when the one request fails (no network, DNS, timeout)
    with pytest.raises(UserError) as err:
        tk.resolve_model_path("org/typo")
    assert "the Hub cannot be reached (one try, 1 s)" in str(err.value) and "\n" not in str(err.value)
    assert hub.asked == ["org/typo"]


def test_online_hub_without_that_model_and_with_it(hub):
    hub.answer = False
    with pytest.raises(UserError, match="the Hub has no model named org/typo"):
        tk.resolve_model_path("org/typo")
    hub.answer = True
    assert tk.resolve_model_path("org/real-model") == "org/real-model"  # transformers downloads it
    assert hub.asked == ["org/typo", "org/real-model"]


def test_a_cached_hub_id_is_read_from_its_snapshot_unless_the_hub_confirms_it(
    tmp_path: Path, hub, monkeypatch
):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(tk, "_cached_snapshot", CACHED_SNAPSHOT)  # the real cache lookup, on this cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode does not hide what is cached
    assert tk.resolve_model_path("org/cached") == str(snapshot)
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        tk.resolve_model_path("org/uncached")
    assert hub.asked == []
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online: the Hub decides, the cache is the fallback
    hub.answer = True
    assert tk.resolve_model_path("org/cached") == "org/cached"  # transformers fetches what the cache lacks
    hub.answer = None
    assert tk.resolve_model_path("org/cached") == str(snapshot)  # unreachable: what is cached, no retries
    assert hub.asked == ["org/cached", "org/cached"]


def test_ask_hub_reads_a_refused_connection_as_unreachable(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a local port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert tk.ask_hub("org/name") is None


def test_an_unreachable_hub_is_answered_without_importing_the_http_client():
    """The connection probe is plain sockets: huggingface_hub's HTTP client (httpx, ~0.4 s) stays unloaded."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import sys\n"
        "from minitrain.data import tokenizer as tk\n"
        "answer = tk.ask_hub('org/nmae')\n"
        "print(answer, sorted(m for m in sys.modules if m.split('.')[0].startswith('httpx')))\n"
    )
    env = {**_clean_env(), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "None []"


def test_a_resolver_that_never_answers_is_left_behind_at_the_deadline(monkeypatch):
    """getaddrinfo has no timeout of its own: a hung lookup must not hold the answer past HUB_TIMEOUT_S."""
    from huggingface_hub import constants

    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: release.wait() and [])
    monkeypatch.setattr(tk, "HUB_TIMEOUT_S", 0.05)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    try:
        assert tk.ask_hub("org/name") is None  # without the deadline this call would wait forever
    finally:
        release.set()


@pytest.mark.parametrize(("status", "answer"), [(404, False), (401, False), (200, True), (500, None)])
def test_ask_hub_reads_the_hubs_answer(status: int, answer: bool | None, monkeypatch):
    """A local server stands in for the Hub: the probe connects, then one HEAD request reads its status."""
    from huggingface_hub import constants

    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - the name http.server dispatches to
            asked.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        for variable in (*tk.OFFLINE_VARIABLES, "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import; it would block the request
        assert tk.ask_hub("org/name") is answer
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/api/models/org/name"]  # one request, no retries


def _clean_env() -> dict[str, str]:
    """This process's environment with offline mode and proxies off, for a child that must try the Hub."""
    drop = {*tk.OFFLINE_VARIABLES, "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"}
    return {k: v for k, v in os.environ.items() if k not in drop and k != "ALL_PROXY"}


def test_load_tokenizer_from_a_folder_and_its_one_line_errors(tmp_path: Path, hub):
    if not SMOLLM2.is_dir():
        pytest.skip(f"fixture tokenizer {SMOLLM2} is absent")
    assert tk.load_tokenizer(SMOLLM2).eos_token == "<|im_end|>"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="the folder has no tokenizer.json"):
        tk.load_tokenizer(tmp_path / "model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(UserError) as err:
        tk.load_tokenizer(broken)
    message = str(err.value)
    assert message.startswith(f"cannot load a tokenizer from {broken} (") and "\n" not in message
    assert message.endswith("); pass a local tokenizer or model folder")  # complete, not cut mid-sentence


def remote_code_tokenizer(folder: Path) -> Path:
    """A tokenizer folder that ships its own tokenizer class (auto_map), as custom Hub repositories do."""
    import shutil

    shutil.copytree(SMOLLM2, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        tokenizer_class="MiniTokenizerFast",
        auto_map={"AutoTokenizer": [None, "tokenization_mini.MiniTokenizerFast"]},
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_mini.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class MiniTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder


def test_trust_remote_code_runs_the_tokenizers_own_class(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = remote_code_tokenizer(tmp_path / "custom")
    with pytest.raises(UserError, match="ships its own tokenizer code; add --trust-remote-code") as err:
        tk.load_tokenizer(folder)
    assert "\n" not in str(err.value)
    assert type(tk.load_tokenizer(folder, trust_remote_code=True)).__name__ == "MiniTokenizerFast"


def test_train_checks_the_data_against_a_remote_code_tokenizer_only_with_the_flag(
    tmp_path: Path, monkeypatch
):
    """Without --trust-remote-code the tokenizer cannot load, so the fingerprint check has nothing to compare
    with; with it the tokenizer loads and a wrong fingerprint is refused: the flag reached the loader."""
    from minitrain.train.preflight import check_tokenizer_matches

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = remote_code_tokenizer(tmp_path / "custom")
    meta = {"tokenizer": {"fingerprint": "0" * 64, "path": "elsewhere"}}
    check_tokenizer_matches(meta, str(folder), tmp_path / "d.jsonl")  # skipped: no tokenizer to compare
    with pytest.raises(UserError, match="was tokenized with elsewhere"):
        check_tokenizer_matches(meta, str(folder), tmp_path / "d.jsonl", trust_remote_code=True)


# The torch-free load: `fast_tokenizer_class` against `AutoTokenizer.from_pretrained` itself (the reference).

FIXTURE_TOKENIZERS = sorted(TOKENIZERS.glob("*/")) if TOKENIZERS.is_dir() else []
TEXTS = ("Hello world!", "  leading spaces\n\ttabs and ünïcödé 中文", "<|im_end|> <think>x</think></s><s>")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def auto_tokenizer(folder: Path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def assert_same_tokenizer(ours, reference) -> None:
    """Same class, vocabulary, special tokens, ids and rendered chat template."""
    from minitrain.data.probe import tokenizer_fingerprint

    assert type(ours) is type(reference)
    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(reference)
    assert repr(ours).split("(", 1)[1] == repr(reference).split("(", 1)[1]  # specials, added tokens, flags
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"]
        assert (
            ours(text, add_special_tokens=False)["input_ids"]
            == reference(text, add_special_tokens=False)["input_ids"]
        )
    if reference.chat_template is not None:
        for prompt in (False, True):
            rendered = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
            assert ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == rendered


@pytest.mark.parametrize("folder", FIXTURE_TOKENIZERS, ids=lambda p: p.name)
def test_every_fixture_tokenizer_takes_the_fast_path_and_loads_what_autotokenizer_loads(folder: Path, hub):
    fast = tk.fast_tokenizer_class(str(folder))
    assert fast is not None, f"{folder.name}: expected the torch-free path"
    reference = auto_tokenizer(folder)
    assert fast is type(reference)
    assert_same_tokenizer(tk.load_tokenizer(folder), reference)


def copy_tokenizer(source: Path, folder: Path, **changes) -> Path:
    """A copy of a fixture tokenizer folder with tokenizer_config.json keys changed (None removes one)."""
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("fixture", "changes", "config_json", "fast_class"),
    [
        # no tokenizer_class: AutoTokenizer decides (from the empty config: TokenizersBackend)
        ("smollm2-135m-instruct", {"tokenizer_class": None}, None, None),
        # a class transformers does not have: AutoTokenizer falls back to TokenizersBackend
        ("smollm2-135m-instruct", {"tokenizer_class": "NoSuchTokenizerFast"}, None, None),
        # Bloom: AutoTokenizer rewrites it to TokenizersBackend
        ("smollm2-135m-instruct", {"tokenizer_class": "BloomTokenizerFast"}, None, None),
        # declared Llama, but tokenizer.json is ByteLevel: AutoTokenizer's override picks TokenizersBackend
        ("smollm2-135m-instruct", {"tokenizer_class": "LlamaTokenizerFast"}, None, None),
        # a config.json whose model type maps to a generic backend: AutoTokenizer ignores the declared class
        ("smollm2-135m-instruct", {}, {"model_type": "phi3"}, None),
        # a config.json that does not change the choice still takes the slow path (no model-type tables)
        ("smollm2-135m-instruct", {}, {"model_type": "gpt2"}, None),
        # PreTrainedTokenizerFast -> PreTrainedTokenizer (PythonBackend) -> TokenizersBackend, as Auto does
        ("smollm2-135m-instruct", {"tokenizer_class": "PreTrainedTokenizerFast"}, None, "TokenizersBackend"),
        ("smollm2-135m-instruct", {"tokenizer_class": "GPT2TokenizerFast"}, None, "GPT2Tokenizer"),
        ("tinyllama-1.1b-chat-v1.0", {"tokenizer_class": "LlamaTokenizerFast"}, None, "LlamaTokenizer"),
    ],
)
def test_built_folders_take_the_fast_path_only_where_autotokenizer_agrees(
    tmp_path: Path, hub, fixture: str, changes: dict, config_json: dict | None, fast_class: str | None
):
    if not (TOKENIZERS / fixture).is_dir():
        pytest.skip(f"fixture tokenizer {fixture} is absent")
    folder = copy_tokenizer(TOKENIZERS / fixture, tmp_path / "tok", **changes)
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    fast = tk.fast_tokenizer_class(str(folder))
    assert (fast and fast.__name__) == fast_class
    assert_same_tokenizer(tk.load_tokenizer(folder), auto_tokenizer(folder))


def test_a_phi3_config_is_why_a_model_folder_takes_the_slow_path(tmp_path: Path, hub):
    """The declared class alone would be wrong here: AutoTokenizer reads the model type and picks another."""
    if not SMOLLM2.is_dir():
        pytest.skip(f"fixture tokenizer {SMOLLM2} is absent")
    folder = copy_tokenizer(SMOLLM2, tmp_path / "tok")  # declares GPT2Tokenizer
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    assert type(auto_tokenizer(folder)).__name__ == "TokenizersBackend"
    assert type(tk.load_tokenizer(folder)).__name__ == "TokenizersBackend"


def test_an_auto_map_folder_takes_the_slow_path_and_runs_the_repositorys_class(tmp_path: Path, hub):
    folder = remote_code_tokenizer(tmp_path / "custom")
    assert tk.fast_tokenizer_class(str(folder)) is None
    ours = tk.load_tokenizer(folder, trust_remote_code=True)
    reference = auto_tokenizer(folder, trust_remote_code=True)
    assert type(ours).__name__ == type(reference).__name__ == "MiniTokenizerFast"
    assert type(ours).__module__ == type(reference).__module__
    assert_same_tokenizer(ours, reference)


def class_names_transformers_maps() -> list[str]:
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    names = {name for name in TOKENIZER_MAPPING_NAMES.values() if name}
    extra = {"PreTrainedTokenizer", "PreTrainedTokenizerFast", "PythonBackend", "BloomTokenizer", "NoSuchTok"}
    return sorted(names | {name + "Fast" for name in names} | extra)


def test_for_every_class_name_the_fast_path_picks_what_autotokenizer_picks(tmp_path: Path, hub, monkeypatch):
    """The reference is AutoTokenizer's own decision: every tokenizer class's `from_pretrained` is replaced by
    one that returns the class and the arguments, so AutoTokenizer and `load_tokenizer` each report what
    they would load, for a tokenizer_config.json naming each class transformers maps (and its Fast name)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    monkeypatch.setattr(
        PreTrainedTokenizerBase,
        "from_pretrained",
        classmethod(lambda cls, *args, **kwargs: (cls, args, kwargs)),
    )
    fast_names = []
    for name in class_names_transformers_maps():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": name}))
        try:
            reference = auto_tokenizer(folder)
        except Exception:  # noqa: BLE001 - a class with its own from_pretrained (RagTokenizer), a dummy ...
            reference = None
        fast = tk.fast_tokenizer_class(str(folder))
        if fast is None:
            continue
        fast_names.append(name)
        assert reference is not None and fast is reference[0], name
        cls, args, kwargs = tk.load_tokenizer(folder)
        kwargs.pop("_commit_hash", None), reference[2].pop("_commit_hash")  # unread by from_pretrained (5.x)
        assert (cls, args, kwargs) == reference, name
    assert len(fast_names) > 100  # nearly every name takes the fast path: the comparison above is not empty


def test_minitrain_tokenize_does_not_import_torch(tmp_path: Path):
    """`python -X importtime` lists every module each process imports (the forkserver and its workers write
    to the same stderr): torch must not be among them, while transformers and the tokenizer are."""
    if not (TOKENIZERS / "qwen3").is_dir() or not (DATA / "alpaca_en_demo.messages.jsonl").is_file():
        pytest.skip("fixture tokenizer or data is absent")
    data = tmp_path / "in.jsonl"
    data.write_text("".join((DATA / "alpaca_en_demo.messages.jsonl").read_text().splitlines(True)[:40]))
    env = {**os.environ, "PYTHONPATH": str(Path(tk.__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-X", "importtime", "-m", "minitrain", "tokenize", str(data)]
    command += ["-o", str(tmp_path / "out.jsonl"), "--model-name-or-path", str(TOKENIZERS / "qwen3")]
    done = subprocess.run(
        command + ["--num-workers", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert {"transformers.tokenization_utils_tokenizers", "tokenizers", "jinja2"} <= imported
    assert (tmp_path / "out.jsonl").stat().st_size > 0
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}
