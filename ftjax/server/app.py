"""The FastAPI app: OpenAI's completions / chat completions / models, vLLM's tokenize /
detokenize, /health and Prometheus /metrics over an `EngineRunner`.

Every error is answered in OpenAI's shape (`protocol.APIError`): bad input is a 400
naming the field and the limit, an unknown model a 404, a missing or wrong key a 401,
a full queue a 503 with Retry-After. An unexpected exception is logged with its
request id and answered 500; the server keeps running.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import AsyncIterator, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftjax.server import text as tx
from ftjax.server.metrics import CONTENT_TYPE, Metrics
from ftjax.server.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest, sampling_params)
from ftjax.server.runner import EngineRunner, Handle
from ftjax.server.scoring import prompt_logprobs

log = logging.getLogger("ftjax.server")
RETRY_AFTER = "1"           # seconds a 503'd client should wait
DISCONNECT_POLL = 0.5       # seconds between disconnect checks of a non-streaming request


class Server:
    """What the routes share: the model (tokenizer, limits), the runner, the options."""

    def __init__(self, model, runner: EngineRunner, metrics: Metrics, served_model_name: str,
                 api_key: Optional[str] = None, max_waiting: int = 256,
                 chat_template: Optional[str] = None):
        self.model = model
        self.cfg = model.config
        self.tokenizer = model.tokenizer
        self.runner = runner
        self.metrics = metrics
        self.name = served_model_name
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.chat_template = chat_template
        self.created = int(time.time())
        self.eos = tuple(t for t in self.cfg.eos_token_ids if t < self.cfg.vocab_size)

    # -- checks --------------------------------------------------------------------

    def check_model(self, name: Optional[str]):
        if name is not None and name != self.name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.name!r}", "model", code="model_not_found")

    def check_ready(self):
        if self.runner.failed is not None:
            raise APIError(503, f"the engine failed to start: {self.runner.failed}",
                           type="service_unavailable")
        if not self.runner.ready.is_set():
            raise APIError(503, "the model is loading and compiling; retry shortly",
                           type="service_unavailable", headers={"Retry-After": RETRY_AFTER})

    def check_capacity(self, count: int):
        s = self.runner.stats()
        waiting = s.get("waiting", 0) + s.get("submitted", 0)
        if waiting + count > self.max_waiting:
            raise APIError(503, f"{waiting} requests are waiting (the server's --max-waiting "
                           f"is {self.max_waiting}); retry later", type="service_unavailable",
                           code="overloaded", headers={"Retry-After": RETRY_AFTER})

    def encode(self, text: str, param: str, special: bool = True) -> List[int]:
        if self.tokenizer is None:
            raise APIError(400, f"{param} is text but this model has no tokenizer; send token "
                           "ids", param)
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def check_ids(self, ids: List[int], param: str):
        v = self.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise APIError(400, f"{param} has token ids {bad[:5]} outside [0, {v})", param)

    def check_lengths(self, ids: List[int], max_new: int, param: str):
        n = self.cfg.max_positions
        if not ids:
            raise APIError(400, f"{param} is empty (0 tokens)", param)
        limit = n if max_new == 0 else n - 1   # generating needs a position for the token
        if len(ids) > limit:
            raise APIError(400, f"{param} has {len(ids)} tokens; the model's context is {n} "
                           f"positions, so a prompt may have at most {limit}", param)
        if len(ids) + max_new > n:
            raise APIError(400, f"max_tokens={max_new} with the {len(ids)} prompt tokens of "
                           f"{param} passes the model's context of {n} positions (at most "
                           f"{n - len(ids)} here)", "max_tokens")

    def decode(self, ids: List[int], skip_special: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    # -- running requests ----------------------------------------------------------

    async def start(self, prompts: List[List[int]], sp, max_new: int) -> Tuple[List[Handle],
                                                                              asyncio.Queue]:
        """Submits one engine request per prompt; waits until each is accepted.

        Raises:
          APIError: 400 with the engine's message when it refuses one (all are aborted).
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        handles = [self.runner.submit(Handle(loop, ids, sp, max_new, events=events, index=i))
                   for i, ids in enumerate(prompts)]
        accepted, early = 0, []
        try:
            while accepted < len(handles):
                h, kind, value = await events.get()
                if kind == "error":
                    raise APIError(400, str(value))
                if kind == "added":
                    accepted += 1
                else:
                    early.append((h, kind, value))
        except BaseException:
            for h in handles:
                h.abort()
            raise
        for item in early:  # outputs that came before the last acceptance
            events.put_nowait(item)
        return handles, events


async def _outputs(handles: List[Handle], events: asyncio.Queue, request: Request,
                   poll: bool) -> AsyncIterator[Tuple[Handle, object]]:
    """(handle, RequestOutput) until every sample of every handle finished; aborts
    them all if the consumer stops early (client gone, error). poll: check for a
    client disconnect while waiting (non-streaming; a stream is cancelled instead)."""
    left = sum(h.sampling.n for h in handles)
    try:
        while left:
            try:
                h, kind, value = await (asyncio.wait_for(events.get(), DISCONNECT_POLL)
                                        if poll else events.get())
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if kind == "error":
                raise APIError(500, str(value), type="internal_error")
            left -= value.finished
            yield h, value
    finally:
        for h in handles:
            h.abort()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(prompts: List[List[int]], completion: int) -> dict:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


async def _event_stream(preamble, outputs, chunk, usage):
    """A streamed response's SSE body: the `preamble` events, one event per engine output
    (`chunk(handle, output)` -> dict), then, if `usage` is given, the usage event
    (`usage(tokens streamed)` -> dict), and `[DONE]`. An APIError raised once the headers
    are sent goes into the stream, followed by `[DONE]`."""
    for obj in preamble:
        yield _sse(obj)
    done_tokens = 0
    try:
        async for h, o in outputs:
            done_tokens += len(o.new_tokens)
            yield _sse(chunk(h, o))
    except APIError as e:
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
        return
    if usage is not None:
        yield _sse(usage(done_tokens))
    yield "data: [DONE]\n\n"


async def _collect(outputs, seq_of):
    """Accumulates a non-streamed response: per sequence `seq_of(handle, output)`, a list
    [tokens, log-probs, top log-probs, finish reason] updated from each output."""
    async for h, o in outputs:
        s = seq_of(h, o)
        s[0] = list(o.tokens)
        s[1] += o.new_log_probs
        s[2] += o.new_top_logprobs or []
        if o.finished:
            s[3] = o.finish_reason


def create_app(server: Server) -> FastAPI:
    """The FastAPI application over a `Server`."""
    app = FastAPI(title="ftjax", docs_url=None, redoc_url=None)
    app.state.server = server
    _errors(app)
    protected = ("/v1/", "/tokenize", "/detokenize")

    @app.middleware("http")
    async def api_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith(protected):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {server.api_key}".encode()):
                e = APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                             type="authentication_error", code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if server.runner.failed is not None:
            return JSONResponse({"status": "failed", "error": str(server.runner.failed)}, 503)
        if not server.runner.ready.is_set():
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": RETRY_AFTER})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": server.name, "object": "model", "created": server.created, "owned_by": "ftjax",
            "max_model_len": server.cfg.max_positions}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            text = tx.render_chat(server.tokenizer, [m.as_dict() for m in req.messages],
                                  server.chat_template, req.add_generation_prompt)
            ids = server.encode(text, "messages", special=False)
        else:
            ids = server.encode(req.prompt, "prompt", special=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.cfg.max_positions}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        server.check_ids(req.tokens, "tokens")
        return {"prompt": server.decode(req.tokens, skip_special=False)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _completions(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await _chat(server, req, request)

    return app


def _errors(app: FastAPI):
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        else:
            msg = f"{field}: {err.get('msg', 'invalid')}"
            if "input" in err and err.get("type") != "missing":
                msg += f" (got {json.dumps(err['input'], default=str)[:100]})"
        return JSONResponse(APIError(400, msg, loc[0] if loc else None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        rid = f"err-{uuid.uuid4().hex[:12]}"
        log.exception("ftjax serve: internal error (request %s, %s %s)", rid, request.method,
                      request.url.path)
        return JSONResponse(APIError(500, f"internal error (request {rid}); see the server log",
                                     type="internal_error").body(), status_code=500)


# -- /v1/completions -------------------------------------------------------------------

def _completion_prompts(server: Server, prompt) -> List[Tuple[List[int], Optional[str]]]:
    """The request's prompts as (token ids, text or None)."""
    if isinstance(prompt, str):
        return [(server.encode(prompt, "prompt"), prompt)]
    if not prompt:
        raise APIError(400, "prompt is an empty list", "prompt")
    if isinstance(prompt[0], int):
        items = [(list(prompt), None)]
    elif isinstance(prompt[0], str):
        items = [(server.encode(p, f"prompt[{i}]"), p) for i, p in enumerate(prompt)]
    else:
        items = [(list(p), None) for p in prompt]
    for i, (ids, _) in enumerate(items):
        server.check_ids(ids, "prompt" if len(items) == 1 else f"prompt[{i}]")
    return items


async def _completions(server: Server, req: CompletionRequest, request: Request):
    server.check_model(req.model)
    server.check_ready()
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} != n={req.n} is not supported (no "
                       "server-side ranking); leave best_of out", "best_of")
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", "suffix")
    items = _completion_prompts(server, req.prompt)
    prompts = [ids for ids, _ in items]
    max_new = (req.max_tokens if req.max_tokens is not None
               else server.cfg.max_positions - max(len(p) for p in prompts))
    for i, ids in enumerate(prompts):
        server.check_lengths(ids, max_new, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    want_lp = req.logprobs is not None
    k = req.logprobs or 0
    sp = sampling_params(req, k, server.eos)
    if req.echo and want_lp and req.stream:
        raise APIError(400, "echo with logprobs is served without streaming only", "stream")
    if max_new == 0 and req.stream:
        raise APIError(400, "max_tokens=0 with stream: nothing to stream", "max_tokens")
    if max_new > 0:
        server.check_capacity(len(prompts))
    rid = f"cmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": server.name}
    scored = []
    if req.echo and want_lp:  # the prompt's log-probs: one teacher-forced forward each
        for ids in prompts:
            scored.append(await asyncio.wrap_future(
                server.runner.call(prompt_logprobs, ids, k)))
    texts = [t if t is not None else server.decode(ids) for ids, t in items]
    n = req.n
    seqs = {}  # choice index -> [tokens, log-probs, tops, finish reason, detokenizer]

    def seq(h: Handle, sample: int):
        return seqs.setdefault(h.index * n + sample, [[], [], [], None, tx.Detokenizer(
            server.tokenizer, sp.stop_strings, req.skip_special_tokens) if server.tokenizer
            else None])

    if max_new == 0:
        for i in range(len(prompts)):
            for j in range(n):
                seqs[i * n + j] = [[], [], [], "length", None]
        handles, events = [], None
    else:
        handles, events = await server.start(prompts, sp, max_new)

    def logprobs_of(index, toks, lps, tops, offset, with_prompt=False):
        if not want_lp:
            return None
        i = index // n
        if k == 0:
            tops = [{t: lp} for t, lp in zip(toks, lps)]
        if with_prompt:
            p_lps, p_tops = scored[i]
            toks = prompts[i] + toks
            lps = [None] + p_lps + lps
            tops = [None] + p_tops + tops
        return tx.completion_logprobs(server.tokenizer, toks, lps, tops, offset)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        echoed = [dict(head, choices=[{"index": i * n + j, "text": t, "logprobs": None,
                                       "finish_reason": None}])
                  for i, t in enumerate(texts) if req.echo for j in range(n)]

        def chunk(h, o):
            s = seq(h, o.sample)
            index = h.index * n + o.sample
            offset = (len(texts[h.index]) if req.echo else 0) + (s[4].shown if s[4] else 0)
            delta = s[4].delta(o.tokens, o.finished) if s[4] else ""
            return dict(head, choices=[{
                "index": index, "text": delta,
                "logprobs": logprobs_of(index, o.new_tokens, o.new_log_probs,
                                        o.new_top_logprobs or [], offset),
                "finish_reason": o.finish_reason}])

        usage = ((lambda done: dict(head, choices=[], usage=_usage(prompts, done)))
                 if include_usage else None)
        return StreamingResponse(
            _event_stream(echoed, _outputs(handles, events, request, poll=False), chunk,
                          usage), media_type="text/event-stream")

    if handles:
        await _collect(_outputs(handles, events, request, poll=True),
                       lambda h, o: seq(h, o.sample))
    choices, completion = [], 0
    for index in sorted(seqs):
        toks, lps, tops, reason, detok = seqs[index]
        completion += len(toks)
        body = detok.text(toks) if detok else ""
        prefix = texts[index // n] if req.echo else ""
        choices.append({"index": index, "text": prefix + body,
                        "logprobs": logprobs_of(index, toks, lps, tops, 0, bool(scored)),
                        "finish_reason": reason})
    return dict(head, choices=choices, usage=_usage(prompts, completion))


# -- /v1/chat/completions ----------------------------------------------------------------

async def _chat(server: Server, req: ChatRequest, request: Request):
    server.check_model(req.model)
    server.check_ready()
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    text = tx.render_chat(server.tokenizer, [m.as_dict() for m in req.messages],
                          server.chat_template, req.add_generation_prompt)
    ids = server.encode(text, "messages", special=False)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = asked if asked is not None else server.cfg.max_positions - len(ids)
    server.check_lengths(ids, max_new, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else 0
    sp = sampling_params(req, k, server.eos)
    n = req.n
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": server.name}
    if max_new == 0:
        raise APIError(400, "max_tokens=0: a chat completion must generate", "max_tokens")
    server.check_capacity(1)
    handles, events = await server.start([ids], sp, max_new)
    detoks = [tx.Detokenizer(server.tokenizer, sp.stop_strings, req.skip_special_tokens)
              for _ in range(n)]

    def logprobs_of(toks, lps, tops):
        if not req.logprobs:
            return None
        tops = tops or [{t: lp} for t, lp in zip(toks, lps)]
        return {"content": tx.chat_logprobs(server.tokenizer, toks, lps, tops, k)}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = dict(head, object="chat.completion.chunk")

        roles = [dict(chunk, choices=[{"index": j, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}])
                 for j in range(n)]

        def event(h, o):
            delta = detoks[o.sample].delta(o.tokens, o.finished)
            return dict(chunk, choices=[{
                "index": o.sample, "delta": {"content": delta} if delta else {},
                "logprobs": logprobs_of(o.new_tokens, o.new_log_probs, o.new_top_logprobs),
                "finish_reason": o.finish_reason}])

        usage = ((lambda done: dict(chunk, choices=[], usage=_usage([ids], done)))
                 if include_usage else None)
        return StreamingResponse(
            _event_stream(roles, _outputs(handles, events, request, poll=False), event, usage),
            media_type="text/event-stream")

    seqs = [[[], [], [], None] for _ in range(n)]
    await _collect(_outputs(handles, events, request, poll=True), lambda h, o: seqs[o.sample])
    choices = [{"index": j, "message": {"role": "assistant", "content": detoks[j].text(s[0])},
                "logprobs": logprobs_of(s[0], s[1], s[2]), "finish_reason": s[3]}
               for j, s in enumerate(seqs)]
    return dict(head, choices=choices, usage=_usage([ids], sum(len(s[0]) for s in seqs)))
