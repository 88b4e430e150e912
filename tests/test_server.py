"""`ftjax serve` (issue 14): the OpenAI API over LLMEngine, driven by the official
`openai` client against a server subprocess on 127.0.0.1 (the bundled model; one
server for the whole module, compiled once), plus in-process checks of the error
paths that need no engine.

Reference results come from the same checkpoint loaded here (`Model.generate` /
`Model.forward`); fp32 on both sides, so log-probs agree to 1e-5 (different XLA
programs: summation order differs, values not bit-equal)."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import ftjax  # noqa: E402
from ftjax.server import text as tx  # noqa: E402
from ftjax.server.protocol import APIError  # noqa: E402
from ftjax.tokenizer import load_tokenizer  # noqa: E402

KEY = "test-key"
NAME = "demo"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`ftjax serve` in a subprocess; yields its base URL once /health is 200."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    port = _free_port()
    env = dict(os.environ, FTJAX_CACHE_DIR="", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    cmd = [sys.executable, "-m", "ftjax", "serve", "--port", str(port), "--max-slots", "4",
           "--num-pages", "80", "--max-waiting", "64", "--api-key", KEY,
           "--served-model-name", NAME, "--chat-template", str(tmp / "chat.jinja"),
           "--prefill-budget", "128", "--log-level", "warning"]
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ftjax serve exited: {(tmp / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("ftjax serve did not become healthy in 600 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model():
    return ftjax.load(ftjax.demo_model_path())


def _text(model, tokens):
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def _metrics(url) -> dict:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_idle(url, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(url)
        if m["ftjax_requests_running"] == 0 and m["ftjax_kv_pages_in_use"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {m}")
        time.sleep(0.1)


# -- completions ------------------------------------------------------------------------

PROMPTS = ["Once upon a time", "def fibonacci(n):", "The weather today"]


@pytest.mark.slow
def test_completions_equal_generate(client, model):
    ref = model.generate(PROMPTS, 12)
    want = [_text(model, t) for t in ref.tokens]
    one = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0)
    assert one.choices[0].text == want[0]
    assert one.usage.prompt_tokens == len(model.tokenizer.encode(PROMPTS[0]))
    assert one.usage.completion_tokens == len(ref.tokens[0])
    assert one.choices[0].finish_reason == ref.finish_reasons[0]
    many = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == want
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == want
    single = client.completions.create(model=NAME, prompt=ids[1], max_tokens=12, temperature=0)
    assert single.choices[0].text == want[1]


@pytest.mark.slow
def test_logprobs_equal_generate(client, model):
    k = 3
    ref = model.generate([PROMPTS[1]], 10, sampling=ftjax.SamplingParams(logprobs=k))
    out = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10,
                                    temperature=0, logprobs=k)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    np.testing.assert_allclose(lp.token_logprobs, ref.log_probs[0], atol=TOL)
    for got, want in zip(lp.top_logprobs, ref.top_logprobs[0]):
        assert len(got) == len(want) and len(got) in (k, k + 1)
        want_text = {model.tokenizer.decode([t]): v for t, v in want.items()}
        assert got.keys() == want_text.keys()
        np.testing.assert_allclose([got[t] for t in got], [want_text[t] for t in got], atol=TOL)
    assert lp.text_offset[0] == 0
    assert lp.text_offset[1] == len(lp.tokens[0])


@pytest.mark.slow
def test_echo_logprobs_equal_forward_log_softmax(client, model):
    """lm-eval's local-completions request: echo, logprobs=1, max_tokens=1."""
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0,
                                    logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids) + 1
    logits = np.asarray(model.forward(np.asarray([ids]))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, atol=TOL)
    # The greedy flag lm-eval derives: the top entry of each position is its argmax.
    for i in range(1, len(ids)):
        assert max(lp.top_logprobs[i].values()) == pytest.approx(logp[i - 1].max(), abs=TOL)
    assert out.choices[0].text.startswith(model.tokenizer.decode(ids))
    # max_tokens=0: scoring only, no generation.
    zero = client.completions.create(model=NAME, prompt=ids, max_tokens=0, logprobs=0,
                                     echo=True)
    assert zero.choices[0].finish_reason == "length"
    np.testing.assert_allclose(zero.choices[0].logprobs.token_logprobs[1:], want, atol=TOL)


@pytest.mark.slow
def test_seeded_sampling_n2_is_reproducible_and_equals_generate(client, model):
    sp = ftjax.SamplingParams(temperature=0.9, top_p=0.95, seed=11, n=2)
    ref = model.generate([PROMPTS[0]], 10, sampling=sp)
    want = [_text(model, t) for t in ref.tokens[0]]
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_p=0.95,
              seed=11, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    got = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert got == want and want[0] != want[1]
    assert got == [c.text for c in sorted(b.choices, key=lambda c: c.index)]


@pytest.mark.slow
def test_stop_and_vllm_extras(client, model):
    ref = _text(model, model.generate([PROMPTS[1]], 16).tokens[0])
    stop = ref[3:6]
    out = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16,
                                    temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == ref[:ref.index(stop)]
    # vLLM's extras ride in the body; a logit_bias of +100 forces its token.
    tok = model.tokenizer.encode(" the")[0]
    forced = client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0,
        logit_bias={str(tok): 100}, extra_body={"top_k": 5, "min_tokens": 2,
                                                "repetition_penalty": 1.1})
    assert forced.choices[0].text == " the" * 4


@pytest.mark.slow
def test_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0.7, seed=3)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    # echo, n = 2: the prompt comes first once per choice, then each choice's text
    kw.update(echo=True, n=2, max_tokens=6)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    for i in range(2):
        texts = [c.choices[0].text for c in chunks if c.choices[0].index == i]
        assert texts[0] == PROMPTS[2] and "".join(texts) == full.choices[i].text


# -- chat -------------------------------------------------------------------------------

@pytest.mark.slow
def test_chat_completions(client, model):
    messages = [{"role": "system", "content": "You write code."},
                {"role": "user", "content": "Write a loop."}]
    prompt = model.tokenizer.apply_chat_template(messages, chat_template=TEMPLATE,
                                                 tokenize=False, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    ref = model.generate([ids], 12, sampling=ftjax.SamplingParams(logprobs=2))
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                         temperature=0, logprobs=True, top_logprobs=2)
    c = out.choices[0]
    assert c.message.role == "assistant" and c.message.content == _text(model, ref.tokens[0])
    assert out.usage.prompt_tokens == len(ids)
    np.testing.assert_allclose([e.logprob for e in c.logprobs.content], ref.log_probs[0],
                               atol=TOL)
    assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        c.message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_template_missing_is_a_400_naming_it():
    tok = load_tokenizer(ftjax.demo_model_path())
    with pytest.raises(APIError, match="no chat template; start the server with "
                                       "--chat-template") as e:
        tx.render_chat(tok, [{"role": "user", "content": "hi"}], None)
    assert e.value.status == 400
    assert tx.render_chat(tok, [{"role": "user", "content": "hi"}], TEMPLATE) == \
        "<|user|>hi\n<|assistant|>"


def test_detokenizer_streams_the_stop_cut_text():
    tok = load_tokenizer(ftjax.demo_model_path())
    ids = tok.encode("one two three four five six")
    d = tx.Detokenizer(tok, ["four"])
    pieces = [d.delta(ids[:i], i == len(ids)) for i in range(1, len(ids) + 1)]
    assert "".join(pieces) == "one two three " == d.text(ids)


# -- other endpoints ----------------------------------------------------------------------

@pytest.mark.slow
def test_models_health_metrics_tokenize(server, client, model):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    names = {line.split()[2] for line in httpx.get(server + "/metrics").text.splitlines()
             if line.startswith("# TYPE")}
    assert {"ftjax_requests_running", "ftjax_requests_waiting", "ftjax_kv_pages_in_use",
            "ftjax_kv_pages_total", "ftjax_prompt_tokens_total", "ftjax_generation_tokens_total",
            "ftjax_prefix_cache_hits_total", "ftjax_time_to_first_token_seconds",
            "ftjax_inter_token_latency_seconds", "ftjax_e2e_request_latency_seconds"} <= names
    m = _metrics(server)
    assert m["ftjax_kv_pages_total"] == 79 and "ftjax_prompt_tokens_total" in m
    auth = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": PROMPTS[0]}, headers=auth).json()
    assert t["tokens"] == model.tokenizer.encode(PROMPTS[0]) and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == model.config.max_positions
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=auth).json()
    assert d == {"prompt": PROMPTS[0]}


# -- errors -------------------------------------------------------------------------------

def _post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(url + path, content=raw, headers=headers)
    return httpx.post(url + path, json=body, headers=headers)


@pytest.mark.slow
@pytest.mark.parametrize("field, value, words", [
    ("temperature", -1, "greater than or equal to 0"),
    ("top_p", 0, "greater than 0"),
    ("top_p", 1.5, "less than or equal to 1"),
    ("n", 0, "greater than or equal to 1"),
    ("logprobs", 21, "less than or equal to 20"),
    ("presence_penalty", 3, "less than or equal to 2"),
    ("max_tokens", 600, "passes the model's context of 512 positions"),
    ("n", 5, "max_slots=4"),
    ("stop_token_ids", list(range(10)), "exceeds the engine's limit"),
    ("bogus", 1, "Extra inputs are not permitted"),
])
def test_bad_fields_are_400_naming_them(server, field, value, words):
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi", field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and field.split("_")[0] in err["message"] + str(err["param"])
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_every_error_code(server, client, model):
    long = [1] * 600
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": long, "max_tokens": 1})
    assert r.status_code == 400 and "600 tokens" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": [5000], "max_tokens": 1})
    assert r.status_code == 400 and "outside [0, 4096)" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    r = _post(server, "/v1/completions", {"model": NAME, "prompt": "hi"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _post(server, "/v1/models", None, key=None).status_code in (401, 405)
    assert httpx.get(server + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="bad", max_retries=0).models.list()
    r = _post(server, "/v1/completions", None, raw=b'{"model": "demo", "prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(server, "/v1/completions", {"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(server, "/v1/chat/completions", {"model": NAME, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server + "/health").status_code == 200  # still up


# -- disconnects and load -----------------------------------------------------------------

@pytest.mark.slow
def test_client_disconnect_frees_slot_and_pages(server):
    before = _metrics(server)["ftjax_generation_tokens_total"]
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.8,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 2:
                break   # hang up mid-stream
    m = _wait_idle(server, timeout=20)
    # Not run to its 400 tokens: aborted (a few chunks of 8 may finish meanwhile).
    assert m["ftjax_generation_tokens_total"] - before < 200


@pytest.mark.slow
def test_concurrent_staggered_clients_equal_generate_alone(server, model):
    """32 greedy clients arriving 30 ms apart, and 6 streaming ones hanging up."""
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    budgets = [4 + (i * 7) % 13 for i in range(32)]
    ref = [_text(model, model.generate([p], b).tokens[0]) for p, b in zip(prompts[:4],
                                                                           budgets[:4])]
    batch = model.generate(prompts, 16)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

        async def one(i):
            await asyncio.sleep(0.03 * i)
            r = await aclient.completions.create(model=NAME, prompt=prompts[i],
                                                 max_tokens=budgets[i], temperature=0)
            return r.choices[0].text

        async def hang_up(i):  # streaming clients leaving after two chunks
            await asyncio.sleep(0.05 * i)
            stream = await aclient.completions.create(model=NAME, prompt=prompts[i], stream=True,
                                                      max_tokens=200, temperature=0)
            got = 0
            async for _ in stream:
                got += 1
                if got == 2:
                    break
            await stream.close()

        try:
            *texts, = await asyncio.gather(*(one(i) for i in range(32)),
                                           *(hang_up(i) for i in range(6)))
            return texts[:32]
        finally:
            await aclient.close()

    got = asyncio.run(run())
    assert got[:4] == ref  # each as if alone
    for i in range(32):  # greedy: a prefix of the (longer) batch generation
        want = model.tokenizer.decode(batch.tokens[i][:budgets[i]], skip_special_tokens=True)
        assert got[i] == want, i
    _wait_idle(server)


# -- in-process: paths that need no engine -------------------------------------------------

class _StubRunner:
    """Stands in for EngineRunner: reports a queue of `waiting` requests."""

    def __init__(self, waiting=0, ready=True):
        import threading

        self.failed = None
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.waiting = waiting
        self.submitted = []

    def stats(self):
        return {"waiting": self.waiting, "submitted": 0, "running": 0}

    def submit(self, handle):
        self.submitted.append(handle)
        return handle


def _app(runner, raise_server_exceptions=True, **kw):
    from fastapi.testclient import TestClient

    from ftjax.server.app import Server, create_app
    from ftjax.server.metrics import Metrics
    from tiny import tiny_config

    class M:
        config = tiny_config()
        tokenizer = None

    return TestClient(create_app(Server(M(), runner, Metrics(runner.stats), "tiny", **kw)),
                      raise_server_exceptions=raise_server_exceptions)


def test_full_queue_is_503_with_retry_after():
    c = _app(_StubRunner(waiting=3), max_waiting=3)
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "--max-waiting is 3" in r.json()["error"]["message"]
    r = _app(_StubRunner(waiting=2), max_waiting=3).post(
        "/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2, "n": 1,
                                 "prompt_too": 1})
    assert r.status_code == 400  # validation comes first


def test_loading_server_is_503_and_text_without_tokenizer_is_400():
    c = _app(_StubRunner(ready=False))
    assert c.get("/health").status_code == 503
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2]})
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    c = _app(_StubRunner())
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "text", "max_tokens": 2})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]


# -- lm-evaluation-harness through the server ----------------------------------------------

@pytest.mark.slow
def test_lm_eval_local_completions_equals_ftjax_and_hf_backends(server, tmp_path):
    """lm-eval's `local-completions` (echo + logprobs over HTTP) gives the metrics of
    ftjax's own lm-eval backend and of lm-eval's `hf` backend (with torch) on the same
    checkpoint. Tolerance 1e-4 relative (as tests/test_lm_eval.py): float32 on both sides, summation order differs; a wrong or
    shifted log-prob moves a metric by > 1e-2."""
    lm_eval = pytest.importorskip("lm_eval")
    import math

    import ftjax.lm_eval  # noqa: F401  (registers "ftjax")
    from lm_eval.tasks import TaskManager

    from lm_eval_tasks import write_tasks

    tasks = ["ftjax_ll", "ftjax_mc", "ftjax_ppl", "ftjax_gen"]
    tasks_dir = write_tasks(str(tmp_path / "tasks"))
    demo = ftjax.demo_model_path()
    max_len = 510  # a rolling window + the one generated token stays within 512 positions

    def run(model, args):
        return lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=tasks, bootstrap_iters=0, log_samples=True,
            task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("OPENAI_API_KEY", KEY)
        ours = run("ftjax", f"pretrained={demo},dtype=float32,max_length={max_len}")
        api = run("local-completions",
                  f"model={NAME},base_url={server}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={demo},max_length={max_len},max_gen_toks=12,num_concurrent=2,"
                  "max_retries=1")
    for task in tasks:
        want = {k: v for k, v in ours["results"][task].items()
                if isinstance(v, float) and not k.endswith("_stderr,none")}
        got = {k: v for k, v in api["results"][task].items() if k in want}
        assert got.keys() == want.keys() and want, task
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-4), (task, k, got[k], want[k])
        if task != "ftjax_gen":
            for a, b in zip(ours["samples"][task], api["samples"][task]):
                for ra, rb in zip(a["filtered_resps"], b["filtered_resps"]):
                    ra, rb = (ra, rb) if isinstance(ra, (list, tuple)) else ([ra], [rb])
                    assert math.isclose(float(ra[0]), float(rb[0]), rel_tol=1e-4), task
    # And lm-eval's own `hf` backend (transformers, torch) on the same checkpoint, when
    # torch is installed: the loglikelihood tasks' metrics (the issue's reference).
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={demo},dtype=float32,max_length={max_len}",
            tasks=tasks[:3], bootstrap_iters=0, batch_size=1, device="cpu",
            task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
    for task in tasks[:3]:
        want = {k: v for k, v in hf["results"][task].items()
                if isinstance(v, float) and not k.endswith("_stderr,none")}
        got = {k: v for k, v in api["results"][task].items() if k in want}
        assert got.keys() == want.keys() and want, task
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-4), (task, k, got[k], want[k])


class _BrokenRunner(_StubRunner):
    """Its first submit raises (a bug inside the server), later ones are refused by
    the engine as bad input would be."""

    def submit(self, handle):
        if not self.submitted:
            self.submitted.append(handle)
            raise RuntimeError("boom")
        handle.put(("error", ValueError("sampling.n=9 exceeds the engine's max_slots=4")))
        return handle


def test_internal_error_is_a_logged_500_and_the_server_keeps_serving(caplog):
    c = _app(_BrokenRunner(), raise_server_exceptions=False)
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2}
    with caplog.at_level("ERROR", logger="ftjax.server"):
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    rid = r.json()["error"]["message"].split("(request ")[1].split(")")[0]
    assert any(rid in rec.getMessage() for rec in caplog.records)
    assert c.get("/health").status_code == 200
    r = c.post("/v1/completions", json=body)  # the engine's refusal is the client's 400
    assert r.status_code == 400 and "max_slots=4" in r.json()["error"]["message"]


def test_serve_flag_errors_are_named(capsys, tmp_path, monkeypatch):
    from ftjax.cli import main

    monkeypatch.setenv("FTJAX_CACHE_DIR", "")  # leave jax's compilation-cache config alone
    from ftjax.server.main import parse_bytes

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
    assert main(["serve", "--kv-memory", "lots"]) == 1
    assert "--kv-memory must be a size such as 2GiB" in capsys.readouterr().err
    assert main(["serve", "--chat-template", str(tmp_path / "none.jinja")]) == 1
    assert "--chat-template" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--max-slots", "0"])
    assert "--max-slots: must be >= 1" in capsys.readouterr().err
