"""`tunery serve`: a real uvicorn server on 127.0.0.1 and a free port, driven by the official openai client."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tunery.generate import Generator  # noqa: E402
from tunery.models import load_model  # noqa: E402
from tunery.serve import check_binding, create_app, is_loopback  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    lm = load_model(str(tiny_llama))
    return lm.model, lm.tokenizer


def test_openai_client_against_server(tiny):
    model, tok = tiny
    app = create_app(model, tok, "tiny", max_batch=8, batch_wait_ms=50, default_max_tokens=8)
    with Server(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]

        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=6, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
        text = r.choices[0].message.content

        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        assert "".join(pieces) == text and finish is not None and usage.completion_tokens == r.usage.completion_tokens

        # several clients at once are generated together
        before = dict(app.state.batcher.stats)
        questions = [f"Question number {i}?" for i in range(6)]

        def ask(q):
            return client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                          {"role": "user", "content": q}],
                                                  max_tokens=5, temperature=0).choices[0].message.content

        with ThreadPoolExecutor(6) as ex:
            answers = list(ex.map(ask, questions))
        stats = app.state.batcher.stats
        assert stats["requests"] - before["requests"] == 6
        assert stats["batches"] - before["batches"] < 6 and stats["largest_batch"] > 1
        assert answers == [ask(q) for q in questions]  # batched or alone, greedy answers agree

        two = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                                             max_tokens=4, temperature=0.9, seed=1)
        assert [c.index for c in two.choices] == [0, 1]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[], max_tokens=2)


def test_api_key_required_on_every_request(tiny):
    model, tok = tiny
    app = create_app(model, tok, "tiny", api_key="s3cret", default_max_tokens=2, generator=Generator(model, tok))
    with Server(app) as url:
        bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
        assert good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}]).choices


def test_stop_strings_cut_the_text(tiny):
    from tunery.serve.batcher import _RowText

    model, tok = tiny
    ids = tok("one two three four").input_ids
    row = _RowText(tok, ["three"])
    out = "".join(row.push(i) for i in ids) + row.finish()
    assert out == "one two " and row.stopped


def test_binding_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "key")
    with pytest.raises(ValueError, match="--api-key"):
        check_binding("0.0.0.0", None)
