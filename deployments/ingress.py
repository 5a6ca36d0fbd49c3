"""The OpenAI-compatible HTTP route (a FastAPI app as a Ray Serve ingress deployment).

Request flow: authenticate (constant-time key check) -> read the body (413 over
`max_body_bytes`) -> parse JSON -> validate against the limits and the vocabulary (400 naming
the parameter; unknown parameters are refused, not ignored) -> check the model name (404) ->
render the chat template / tokenize, on a worker thread so the event loop keeps serving every
other stream -> check the context (400 with both numbers) -> one streaming call to the engine
deployment per prompt -> OpenAI responses or SSE chunks.

The first output is awaited for up to `FIRST_OUTPUT_WAIT_S` before answering, so an overloaded
engine still gets a proper 503 with `Retry-After`; a stream still queued after that starts
anyway (headers only), and sends a keep-alive after every `stream_keepalive_s` without a token,
so proxies do not cut it: by default a data chunk with empty `choices`, the one form that
`vllm bench serve` (which strips every network read), the official SDK, curl and EventSource
all read (`stream_keepalive: comment | off` for the others). Errors after the
first byte go out as a `data:` error frame, then `[DONE]`. Only the client's own mistakes
(`InvalidRequest` from the engine) are 400s; anything else is a 500 that names the request id
(and is logged with it), never a stack trace. A client that disconnects cancels the stream,
which aborts the request in the engine and frees its KV blocks.
"""


import asyncio
import hmac
import importlib.metadata
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from deployments import responses as responses_api
from deployments import tracing
from deployments.config import parse_args
from deployments.errors import APIError, from_validation
from deployments.lora_registry import LoraRegistry
from deployments.openai_format import (
    DONE,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echo_text,
    envelope,
    join_logprobs,
    prompt_entries,
    sse,
    usage,
    vllm_prompt_logprobs,
)
from deployments.outputs_channel import OutputHub
from deployments.protocol import (
    RESPONSES_PARAMS,
    ChatCompletionRequest,
    CompletionRequest,
    Detokenize,
    ResponsesRequest,
    TokenizeChat,
    TokenizeCompletion,
)
from deployments.resume import ResumableStream, Waiting, is_loss
from deployments.tools import ToolPlan, ToolStream, render_messages
from engine import trace as trace_hops
from engine.engine import resolve_max_tokens
from engine.factory import load_tokenizer
from engine.outputs import RequestOutput
from moe_parallel.contract import SamplingParams
from moe_parallel.model.config import ModelConfig
from moe_parallel.sampling.guided import Grammars

log = logging.getLogger(__name__)
access = logging.getLogger("ray.serve")  # the replica's log, in Serve's format and encoding
try:
    VERSION = importlib.metadata.version("moe-serve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
app = FastAPI(title="moe-serve", docs_url=None, redoc_url=None)

HEALTH_WAIT_S = 5.0  # for the metrics hub's answer to /health
FIRST_OUTPUT_WAIT_S = 1.0  # long enough for Serve's back-pressure answer; then the stream starts
KEEPALIVE_COMMENT = ": keep-alive\n\n"  # an SSE comment (`stream_keepalive: comment`)
RESUMING_COMMENT = ": resuming\n\n"  # while a request whose replica was lost waits for another (resume.py)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class OpenAIRoutes:
    def __init__(self, engine, hub, args: dict):
        self.args = parse_args(args)
        # streams from the engine replicas over Serve's gRPC transport, as SERVE_ENV makes the
        # default (cluster.serve_env), also on a cluster started without it
        self.engine, self.engine_calls, self.hub = engine.options(stream=True, _by_reference=False), engine, hub
        self.outputs = OutputHub()  # outputs of the engine replicas on this host, one message per step
        self.tokenizer = load_tokenizer(self.args.model)
        config = ModelConfig.from_dir(self.args.model)
        self.vocab = config.vocab_size
        self.loras = LoraRegistry(config, self.args.name, self.args.lora_modules, self.args.max_lora_rank)
        self.grammars = Grammars(self.tokenizer, config.vocab_size, config.eos_token_ids)
        self.system_role = _takes_system_turns(self.tokenizer)  # Mixtral's template has none
        self.tracer = tracing.tracer(self.args.otlp_traces_endpoint, "ingress")
        self.quantization = self.args.quant().scheme  # of the experts; the dense weights are in `dtype`
        self.created = int(time.time())

    # -- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once an engine replica has its model up; until then 503 with the fraction of the
        weights loaded so far (the workers report it to the metrics hub as they go)."""
        try:
            state = await asyncio.wait_for(self.hub.health.remote(), timeout=HEALTH_WAIT_S)
        except Exception:  # the hub itself is not up (yet): not ready either
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if state["ready"]:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading", "loading": state["loading"]}, status_code=503)

    @app.get("/metrics")
    async def metrics(self, request: Request):
        if self.args.metrics_require_key and (denied := self._auth(request)) is not None:
            return denied
        text = await self.hub.render.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._auth(request)) is not None:
            return denied
        base = {"id": self.args.name, "object": "model", "created": self.created, "owned_by": "moe-serve",
                "root": self.args.model, "parent": None, "max_model_len": self.args.context_len,
                "quantization": self.quantization}
        adapters = [base | {"id": name, "root": path, "parent": self.args.name}
                    for name, path in self.loras.paths.items()]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        return await self._lora_admin(request, load=True)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        return await self._lora_admin(request, load=False)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._serve(request, ChatCompletionRequest, self._chat_prompts, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, self._completion_prompts, chat=False)

    @app.post("/v1/responses")
    async def responses(self, request: Request):
        """OpenAI's Responses API, answered by the chat path (`responses.py` writes its shapes)."""
        return await self._serve(request, ResponsesRequest, self._chat_prompts, chat=True)

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        """vLLM's: a prompt, or chat messages through the template, to token ids."""
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            raw = await self._json(request)
            body = self._validate(TokenizeChat if "messages" in raw else TokenizeCompletion, raw)
            ids = await asyncio.to_thread(self._tokenize, body)
            strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
            return JSONResponse({"count": len(ids), "max_model_len": self.args.context_len, "tokens": ids,
                                 "token_strs": strs})
        except APIError as exc:
            return exc.response()
        except Exception as exc:
            return _classify(exc, "tokenize").response()

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        """vLLM's: token ids to text."""
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = self._validate(Detokenize, await self._json(request))
            return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, body.tokens)})
        except APIError as exc:
            return exc.response()
        except Exception as exc:
            return _classify(exc, "detokenize").response()

    @app.get("/version")
    async def version(self) -> JSONResponse:
        return JSONResponse({"version": VERSION})

    # -- the shared path ----------------------------------------------------------------------

    async def _serve(self, request: Request, model_cls, to_prompts, chat: bool):
        """Answer one generation request, and log one line for it when it is over (Serve's own
        access log is off: `app.py`)."""
        responses = model_cls is ResponsesRequest
        rid = f"{'resp' if responses else 'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        done = _RequestLog(rid, request.url.path)
        if self.args.otlp_traces_endpoint:
            done.span = tracing.start_request(self.tracer, rid, request.url.path, self.args.name,
                                              dict(request.headers))
        response = await self._generate(request, model_cls, to_prompts, chat, rid, done)
        if isinstance(response, StreamingResponse):
            response.body_iterator = done.streamed(response.body_iterator)
        else:
            done.write(response.status_code)
        return response

    async def _generate(self, request: Request, model_cls, to_prompts, chat: bool, rid: str, done: "_RequestLog"):
        responses = model_cls is ResponsesRequest
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = original = await self._parse(request, model_cls)
            if responses:
                body = self._validate(ChatCompletionRequest, original.chat_fields(self.system_role), RESPONSES_PARAMS)
            lora = self.loras.resolve(body.model)
            prompts = await asyncio.to_thread(to_prompts, body)  # templating and tokenising can be slow
            plan = ToolPlan(body) if chat else None
            params = await asyncio.to_thread(self._sampling, body, plan)  # grammars compile off the event loop
            params.check_vocab(self.vocab)
            for ids in prompts:
                resolve_max_tokens(len(ids), params.max_tokens, self.args.context_len)
            trace = request.headers.get(trace_hops.HEADER) == "1"  # the per-hop timestamps (bench.hops)
            context = tracing.carrier(done.span) if done.span is not None else None
            streams = [self._call(f"{rid}-{i}", ids, params, lora, trace, context) for i, ids in enumerate(prompts)]
            merged = _merge(streams)
            first = asyncio.ensure_future(_first(merged, rid))
            try:
                await asyncio.wait({first}, timeout=FIRST_OUTPUT_WAIT_S)
            except asyncio.CancelledError:  # the client left while queued: abort in the engine too
                await asyncio.shield(_close(first, merged))
                raise
            if first.done():
                first.result()  # over capacity, or a bad request the engine caught: answer with its status
        except APIError as exc:
            return exc.response()
        except Exception as exc:
            return _classify(exc, rid).response()
        writer = _ResponsesWriter(self, body, rid, prompts, plan, original) if responses else \
            _Writer(self, body, rid, prompts, chat, plan)
        done.writer = writer
        if body.stream:
            return StreamingResponse(writer.stream(first, merged), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        try:
            return JSONResponse(await writer.whole(await first, merged))
        except Exception as exc:
            return _classify(exc, rid).response()
        finally:
            await _close(first, merged)

    def _auth(self, request: Request) -> JSONResponse | None:
        key = self.args.api_key or os.environ.get(self.args.api_key_env)
        if not key:
            return None
        sent = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, f"Bearer {key}".encode()):
            return APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                            code="invalid_api_key").response()
        return None

    async def _read(self, request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to be over the limit."""
        limit = self.args.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse(self, request: Request, model_cls):
        return self._validate(model_cls, await self._json(request))

    async def _json(self, request: Request) -> dict:
        """The body as a JSON object (a 400 for anything else, 413 over the limit)."""
        raw_bytes = await self._read(request)
        try:
            raw = json.loads(raw_bytes, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:  # a JSON escape such as \\ud800 spells a lone surrogate, which no tokenizer can encode
            json.dumps(raw, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "The request body contains invalid Unicode (a lone surrogate escape).",
                           code="invalid_json") from None
        return raw

    def _validate(self, model_cls, raw: dict, renamed: dict[str, str] | None = None):
        """`raw` as `model_cls` under the app's limits (a 400 naming the field; `renamed` maps the
        model's field names to the ones the client sent). A model named in the body must be served."""
        try:
            body = model_cls.model_validate(raw, context={"limits": self.args.limits, "vocab": self.vocab})
        except ValidationError as exc:
            raise from_validation(exc, renamed) from None
        except RecursionError:
            raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
        model = getattr(body, "model", None)
        if model is not None and model != self.args.name and model not in self.loras.paths:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return body

    def _tokenize(self, body: TokenizeChat | TokenizeCompletion) -> list[int]:
        if isinstance(body, TokenizeCompletion):
            return self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        text = self._render(body, body.add_generation_prompt, body.continue_final_message)
        return self.tokenizer(text, add_special_tokens=body.add_special_tokens).input_ids

    async def _lora_admin(self, request: Request, load: bool):
        """vLLM's bodies: {"lora_name", "lora_path"} to load, {"lora_name"} to unload."""
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            if not self.args.enable_lora_loading:
                raise APIError(404, "Loading LoRA adapters at run time is not enabled on this server "
                               "(app arg enable_lora_loading).", code="not_enabled")
            raw = json.loads(await self._read(request) or b"{}")
            name = raw.get("lora_name") if isinstance(raw, dict) else None
            if not isinstance(name, str) or not name:
                raise APIError(400, "lora_name: a non-empty string is required", param="lora_name")
            if load:
                path = raw.get("lora_path")
                if not isinstance(path, str) or not path:
                    raise APIError(400, "lora_path: a non-empty string is required", param="lora_path")
                await asyncio.to_thread(self.loras.add, name, path)
                return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")
            try:
                self.loras.remove(name)
            except KeyError:
                raise APIError(404, f"The LoRA adapter `{name}` is not loaded.", param="lora_name",
                               code="model_not_found") from None
            await self.engine_calls.unload_lora.remote(name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
        except APIError as exc:
            return exc.response()
        except json.JSONDecodeError:
            return APIError(400, "The request body is not valid JSON.", code="invalid_json").response()
        except Exception as exc:
            return _classify(exc, "lora-admin").response()

    def _sampling(self, body, plan: ToolPlan | None) -> SamplingParams:
        """The request's sampling parameters, with its grammar (checked: a 400 if it does not
        compile) and its bad words as token sequences."""
        params = body.to_sampling()
        guided = (plan.guided() if plan is not None else None) or body.guided()
        if guided is not None:
            self.grammars.check(guided)
        changes = {"guided": guided}
        if plan is not None and plan.mode == "auto":
            changes["skip_special_tokens"] = False  # a tool-call marker may be a special token
        if body.bad_words:
            changes["bad_words"] = bad_word_ids(self.tokenizer, body.bad_words)
        return replace(params, **changes)

    def _chat_prompts(self, body: ChatCompletionRequest) -> list[list[int]]:
        return [self.tokenizer(self._render(body), add_special_tokens=False).input_ids]

    def _render(self, body, add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
        """The chat template over the body's messages; its own refusals are 400s."""
        try:
            return render_messages(body, self.tokenizer, add_generation_prompt, continue_final_message)
        except Exception as exc:  # the template's own raise_exception: roles out of order, unknown role
            message = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise APIError(400, f"messages: {message}", param="messages", code="invalid_messages") from None

    def _completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        out = []
        for p in body.prompts():
            ids = self.tokenizer(p).input_ids if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            if any(not 0 <= t < self.vocab for t in ids):  # pre-checked at validation; kept as the last word
                raise APIError(400, f"prompt: token ids must be in [0, {self.vocab})", param="prompt")
            out.append(ids)
        return out

    def _call(self, request_id: str, ids: list[int], params, lora, trace: bool = False,
              trace_context: dict | None = None) -> ResumableStream:
        """One prompt's engine stream, resumed on another replica if its replica is lost (`resume.py`)."""
        def call(attempt: int, resume: dict[int, list[int]] | None):
            rid = request_id if not attempt else f"{request_id}-resume{attempt}"
            response = self.engine.generate.remote(rid, ids, params, lora, trace, self.outputs.sink, trace_context,
                                                   resume)
            return self.outputs.stream(rid, range(params.n) if resume is None else sorted(resume), response)

        return ResumableStream(call, params.n, self.args.resume_timeout_s, self.args.stream_keepalive_s,
                               self._resumed, request_id)

    def _resumed(self, seconds: float) -> None:
        """Counted by the metrics hub (moe_serve:requests_resumed_total, moe_serve:resume_seconds);
        best effort: the request goes on either way."""
        if self.hub is not None:
            try:
                self.hub.resumed.remote(seconds)
            except Exception as exc:
                log.debug("could not count a resumption: %s", exc)


# The routes class stays importable under its own name, so Ray ships it by reference (with this
# module's globals) instead of by value; the Serve wrapper is a separate name.
OpenAIIngress = serve.ingress(app)(OpenAIRoutes)


class _RequestLog:
    """The one log line of a client request: its id, route, status, tokens and time."""

    def __init__(self, rid: str, path: str):
        self.rid, self.path, self.start = rid, path, time.monotonic()
        self.writer: _Writer | None = None
        self.span = None  # the request's trace span, when tracing is on

    def write(self, status: int, outcome: str = "") -> None:
        w = self.writer
        prompt = sum(len(p) for p in w.prompts) if w is not None else 0
        completion = w.completion_tokens if w is not None else 0
        access.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.3fs%s", self.rid, self.path, status, prompt,
                    completion, time.monotonic() - self.start, outcome)
        if self.span is not None:
            tracing.finish(self.span, status, prompt, completion)

    async def streamed(self, frames: AsyncIterator[str]) -> AsyncIterator[str]:
        outcome = " (client left)"
        try:
            async for frame in frames:
                yield frame
            outcome = ""
        finally:
            self.write(200, outcome)


class _Writer:
    """Builds one request's response from the merged engine outputs."""

    def __init__(self, ingress: OpenAIRoutes, body, rid: str, prompts: list[list[int]], chat: bool,
                 plan: ToolPlan | None = None):
        self.body, self.rid, self.prompts, self.chat = body, rid, prompts, chat
        self.model, self.created = ingress.args.name, int(time.time())
        self.tokenizer = ingress.tokenizer
        self.text_of = TokenText(ingress.tokenizer, body.return_tokens_as_token_ids)
        self.n = body.n
        self.keepalive_s, self.keepalive = ingress.args.stream_keepalive_s, ingress.args.stream_keepalive
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}  # prompt index -> its tokens found in the prefix cache
        self.plan = plan if plan is not None and plan.active else None
        self._echoes: dict[int, tuple[str, list[int]]] = {}

    def index(self, prompt_idx: int, out: RequestOutput) -> int:
        return prompt_idx * self.n + out.index

    def echo(self, prompt_idx: int) -> tuple[str, list[int]]:
        """The echoed prompt text and each prompt token's offset in it."""
        if self.chat or not self.body.echo:
            return "", []
        if prompt_idx not in self._echoes:
            self._echoes[prompt_idx] = echo_text(self.tokenizer, self.prompts[prompt_idx])
        return self._echoes[prompt_idx]

    def _count_cached(self, prompt_idx: int, out: RequestOutput) -> None:
        """A prompt's cached tokens, counted once however many choices it has (the most any
        choice found: they share the prompt's blocks)."""
        self.cached[prompt_idx] = max(self.cached.get(prompt_idx, 0), out.cached_tokens)

    def _prompt_part(self, prompt_idx: int, out: RequestOutput) -> tuple[str, dict | None, list | None]:
        """For a completion's first piece: the echoed text, the prompt's entries in `logprobs`
        (with echo), and vLLM's `prompt_logprobs` (when asked)."""
        text, offsets = self.echo(prompt_idx)
        entries = out.prompt_logprobs
        lp = None
        if not self.chat and self.body.echo and self.body.logprobs is not None and entries is not None:
            lp = prompt_entries(self.prompts[prompt_idx], entries, self.text_of, offsets)
        extra = vllm_prompt_logprobs(entries, self.text_of) if self.body.prompt_logprobs is not None \
            and entries is not None else None
        return text, lp, extra

    async def whole(self, first, merged) -> dict:
        choices: dict[int, dict] = {}
        async for prompt_idx, out in _chain(first, merged):
            if isinstance(out, Waiting):
                continue
            i = self.index(prompt_idx, out)
            if i not in choices:
                text, lp, extra = self._prompt_part(prompt_idx, out)
                choices[i] = {"text": text, "echo": len(text), "prompt_lp": lp, "prompt_logprobs": extra,
                              "logprobs": [], "finish": None}
            c = choices[i]
            c["text"] += out.text
            c["logprobs"] += list(out.logprobs or ())
            c["finish"] = out.finish_reason or c["finish"]
            self.completion_tokens += len(out.token_ids)
            self._count_cached(prompt_idx, out)
        prompt_tokens = sum(len(p) for p in self.prompts)
        result = envelope(self.rid, "chat.completion" if self.chat else "text_completion", self.model, self.created)
        result["choices"] = [self._choice(i, c) for i, c in sorted(choices.items())]
        if self.chat and self.body.prompt_logprobs is not None and choices:
            result["prompt_logprobs"] = choices[min(choices)]["prompt_logprobs"]
        result["usage"] = usage(prompt_tokens, self.completion_tokens, sum(self.cached.values()))
        return result

    def _choice(self, i: int, c: dict) -> dict:
        if self.chat:
            lp = chat_logprobs(c["logprobs"], self.text_of) if self.body.logprobs else None
            message = {"role": "assistant", "content": c["text"]}
            finish = c["finish"]
            if self.plan is not None:
                content, calls = self.plan.parse(c["text"])
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                finish = self.plan.finish_reason(calls, finish)
            return {"index": i, "message": message, "logprobs": lp, "finish_reason": finish}
        lp = None
        if self.body.logprobs is not None:
            lp = completion_logprobs(c["logprobs"], self.text_of, c["echo"])
            if c["prompt_lp"] is not None:
                lp = join_logprobs(c["prompt_lp"], lp)
        choice = {"index": i, "text": c["text"], "logprobs": lp, "finish_reason": c["finish"]}
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = c["prompt_logprobs"]
        return choice

    async def stream(self, pending: asyncio.Future, merged) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = envelope(self.rid, obj, self.model, self.created)
        offsets: dict[int, int] = {}
        tools: dict[int, ToolStream] = {}
        try:
            while not pending.done():  # still queued: keep the connection visibly alive
                await asyncio.wait({pending}, timeout=self.keepalive_s)
                if not pending.done() and self.keepalive != "off":
                    yield KEEPALIVE_COMMENT if self.keepalive == "comment" else sse(head | {"choices": []})
            first = pending.result()
            if self.chat:
                for prompt_idx in range(len(self.prompts)):
                    for k in range(self.n):
                        yield sse(head | {"choices": [{"index": prompt_idx * self.n + k, "delta": {
                            "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            async for prompt_idx, out in _chain(first, merged):
                if isinstance(out, Waiting):  # its replica was lost; it waits for another
                    yield RESUMING_COMMENT
                    continue
                self.completion_tokens += len(out.token_ids)
                self._count_cached(prompt_idx, out)
                i = self.index(prompt_idx, out)
                if self.chat:
                    for frame in self._chat_deltas(head, i, out, tools):
                        yield frame
                else:
                    yield sse(_traced(head | {"choices": [self._delta(i, prompt_idx, out, offsets)]}, out))
            if self.body.stream_options and self.body.stream_options.include_usage:
                prompt_tokens = sum(len(p) for p in self.prompts)
                yield sse(head | {"choices": [], "usage": usage(prompt_tokens, self.completion_tokens,
                                                                sum(self.cached.values()))})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield _classify(exc, self.rid).sse()
        finally:
            await _close(pending, merged)  # a client gone mid-stream: the engine streams close, which aborts
        yield DONE

    def _chat_deltas(self, head: dict, i: int, out: RequestOutput, tools: dict[int, ToolStream]):
        extra = _traced({}, out)
        if out.prompt_logprobs is not None and self.body.prompt_logprobs is not None:
            extra["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs, self.text_of)
        lp = chat_logprobs(list(out.logprobs or ()), self.text_of) if self.body.logprobs else None
        if self.plan is None:
            yield sse(head | extra | {"choices": [{"index": i, "delta": {"content": out.text} if out.text else {},
                                                    "logprobs": lp, "finish_reason": out.finish_reason}]})
            return
        ts = tools.setdefault(i, ToolStream(self.plan))
        delta = ts.delta(out.text)
        finish = None
        if out.finish_reason is not None:
            if delta is not None:
                yield sse(head | extra | {"choices": [{"index": i, "delta": delta, "logprobs": lp,
                                                        "finish_reason": None}]})
                extra, lp = {}, None
            delta, finish = ts.close(out.finish_reason)
        if delta is not None or finish is not None or lp is not None:
            yield sse(head | extra | {"choices": [{"index": i, "delta": delta or {}, "logprobs": lp,
                                                    "finish_reason": finish}]})

    def _delta(self, i: int, prompt_idx: int, out: RequestOutput, offsets: dict[int, int]) -> dict:
        text, lp, prompt_lp, extra = out.text, None, None, None
        if i not in offsets:  # the choice's first piece: the echo and the prompt's logprobs come with it
            echo, prompt_lp, extra = self._prompt_part(prompt_idx, out)
            text, offsets[i] = echo + text, len(echo)
        if self.body.logprobs is not None:
            lp = completion_logprobs(list(out.logprobs or ()), self.text_of, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
            if prompt_lp is not None:
                lp = join_logprobs(prompt_lp, lp)
        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
        if extra is not None:
            choice["prompt_logprobs"] = extra
        return choice


class _ResponsesWriter(_Writer):
    """The chat path's outputs written as a Responses API response (`responses.py`)."""

    def __init__(self, ingress: OpenAIRoutes, body, rid: str, prompts: list[list[int]], plan: ToolPlan | None,
                 request: ResponsesRequest):
        super().__init__(ingress, body, rid, prompts, True, plan)
        self.response = responses_api.Response(rid, request, self.model, self.created)

    async def whole(self, first, merged) -> dict:
        chat = await super().whole(first, merged)
        return responses_api.from_chat(self.response, chat["choices"][0], chat["usage"])

    async def stream(self, pending: asyncio.Future, merged) -> AsyncIterator[str]:
        events = responses_api.Events(self.response)
        for frame in events.start():
            yield frame
        try:
            while not pending.done():  # still queued: the in-progress event again is the keep-alive
                await asyncio.wait({pending}, timeout=self.keepalive_s)
                if not pending.done() and self.keepalive != "off":
                    yield events.waiting()
            text, finish = "", None
            async for _, out in _chain(pending.result(), merged):
                if isinstance(out, Waiting):
                    yield RESUMING_COMMENT
                    continue
                self.completion_tokens += len(out.token_ids)
                self._count_cached(0, out)
                text += out.text
                finish = out.finish_reason or finish
                if self.plan is None and out.text:  # tool calls are parsed from the whole text
                    for frame in events.delta(out.text):
                        yield frame
            content, calls = self.plan.parse(text) if self.plan is not None else (text, [])
            if self.plan is not None:
                finish = self.plan.finish_reason(calls, finish)
            for frame in events.finish(content, calls, finish, usage(len(self.prompts[0]), self.completion_tokens,
                                                                      sum(self.cached.values()))):
                yield frame
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield events.error(_classify(exc, self.rid))
        finally:
            await _close(pending, merged)


async def _merge(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as (prompt index, output), failing with the first error.
    Closing it early cancels the streams still running, which aborts their requests."""
    done: set[int] = set()
    tasks: list[asyncio.Task] = []
    try:
        if len(streams) == 1:
            async for chunk in streams[0]:
                _received(chunk)
                for out in chunk:
                    yield 0, out
            done.add(0)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s) -> None:
            try:
                async for chunk in s:
                    _received(chunk)
                    for out in chunk:
                        await queue.put((i, out))
                await queue.put((i, None))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                await queue.put((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        while len(done) < len(streams):
            i, item = await queue.get()
            if item is None:
                done.add(i)
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for i, s in enumerate(streams):
            if i not in done and hasattr(s, "cancel"):
                s.cancel()


def _received(chunk: list[RequestOutput]) -> None:
    if chunk and chunk[0].trace is not None:
        now = time.monotonic()
        for out in chunk:
            out.trace.setdefault("ingress_recv", now)  # an outputs channel stamps it on arrival


def _traced(frame: dict, out: RequestOutput) -> dict:
    """A traced request's SSE chunk carries its hop times (engine.trace), the ingress's last."""
    if out.trace is not None:
        frame[trace_hops.FIELD] = out.trace | {"ingress_send": time.monotonic()}
    return frame


async def _first(merged, rid: str) -> tuple[int, RequestOutput] | None:
    try:
        return await anext(merged)
    except StopAsyncIteration:
        return None
    except Exception as exc:
        raise _classify(exc, rid) from None


async def _chain(first, merged):
    if first is not None:
        yield first
    async for item in merged:
        yield item


async def _close(pending: asyncio.Future, merged) -> None:
    """Stop waiting for the first output and close the engine streams (aborting what still runs)."""
    if not pending.done():
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    await merged.aclose()


def _takes_system_turns(tokenizer) -> bool:
    """Whether the chat template renders a system turn (rather than raising on it)."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
                                      tokenize=False, add_generation_prompt=True)
        return True
    except Exception:
        return False


def bad_word_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's reading of bad_words: each word's tokens as it would start the text, and with a
    leading space where that is a different first token of the same length (mid-text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(w for w in out if w)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes.",
                    code="request_too_large")


def _classify(exc: BaseException, rid: str) -> APIError:
    """Any failure -> the OpenAI error a client should see (never a stack trace)."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None)
    names = {t.__name__ for e in (exc, cause) if e is not None for t in type(e).__mro__}
    if "BackPressureError" in names:
        return APIError(503, "The server is over capacity; retry shortly.", code="over_capacity", retry_after=1)
    if is_loss(exc):
        return APIError(503, "The model instance is restarting; retry shortly.", code="engine_unavailable",
                        retry_after=1)
    if "InvalidRequest" in names:  # the client's own mistake, caught by the engine
        origin = cause if cause is not None and "InvalidRequest" in {t.__name__ for t in type(cause).__mro__} else exc
        message = str(origin).strip().splitlines()[-1] if str(origin).strip() else "invalid request"
        return APIError(400, message, param=getattr(origin, "param", None), code="invalid_request")
    log.error("request %s failed", rid, exc_info=exc)
    return APIError(500, f"The server failed while handling request {rid}; it has been logged under that id.",
                    code="internal_error")
