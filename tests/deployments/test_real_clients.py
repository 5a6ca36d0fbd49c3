"""Real clients, unmodified, against a live app (disaggregated: 1 attention + 2 expert actors;
grammar masks and prompt logprobs are computed on the attention actor):

- structured outputs: 20 generated JSON schemas (objects, arrays, enums, nested, bounded
  numbers), streamed and not, every answer parses and validates (the random tiny model writes
  garbage without the grammar); regex, choice and Lark grammars; bad_words;
- tools: `required` and a named function decode valid arguments, streamed as OpenAI's deltas;
  tool results in the conversation;
- OpenAI's Responses API through the SDK's `client.responses`: plain, streamed, a JSON schema and a
  tool, each equal to the chat route's answer to the same greedy request; bad fields are 400s;
- the `openai` SDK's `chat.completions.parse` and langchain-openai's `with_structured_output`;
- lm-evaluation-harness' `local-completions` model on a local multiple-choice task (its
  log-likelihoods equal transformers') and a generate_until task (greedy text equals transformers').
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from tests.deployments.conftest import API_KEY
from tests.reference import reference_greedy, reference_logits

MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "Describe it as JSON."}]
# Byte-level token ids of `]`, `}`, `"` and `)`. Where a grammar leaves a document open-ended
# (a list of any length, any JSON object), a bias towards closing makes the random model end it
# within the token budget on any machine; the grammar still decides what is allowed.
CLOSE_LIST, CLOSE_OBJECT, QUOTE, CLOSE_PAREN = "96", "128", "37", "44"


@pytest.fixture(scope="module")
def url(shared_url):
    return shared_url


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=120)


def stream_chat(url: str, body: dict) -> tuple[str, dict[int, dict], str | None]:
    """Accumulate a chat stream the way the openai SDK does: (content, tool calls by index, finish)."""
    content, calls, finish = "", {}, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                delta = c["delta"]
                content += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["name"] = fn.get("name") or slot["name"]
                    slot["arguments"] += fn.get("arguments") or ""
                finish = c["finish_reason"] or finish
    return content, calls, finish


# -- JSON schemas -------------------------------------------------------------------------------

def make_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["array", "object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = rng.uniform(-10, 10)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 100), 2)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": make_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    return make_object(rng, depth + 1)


def make_object(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "size", "tags", "owner", "score", "kind", "meta"], rng.randint(1, 4))
    props = {n: make_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.8]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [make_object(random.Random(i), 0) if i % 4 else
           {"type": "array", "items": make_object(random.Random(i), 1), "minItems": 1, "maxItems": 2}
           for i in range(20)]


def _json_schema_body(i: int, schema: dict) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "temperature": 1.0, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                        "strict": True}}}


def test_every_json_schema_answer_parses_and_validates(url):
    def whole(i: int) -> None:
        r = post(url, "/v1/chat/completions", _json_schema_body(i, SCHEMAS[i]))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[i])

    def streamed(i: int) -> None:
        content, calls, finish = stream_chat(url, _json_schema_body(i, SCHEMAS[i]) | {"seed": 100 + i})
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(content), SCHEMAS[i])

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(whole, i) for i in range(20)] + [pool.submit(streamed, i) for i in range(20)]:
            f.result()


def test_without_the_grammar_the_tiny_model_writes_no_json(url):
    """What the grammar is up against (so the test above means something)."""
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "seed": 1})
    with pytest.raises(ValueError):
        json.loads(r.json()["choices"][0]["message"]["content"])


def test_json_object_regex_choice_and_grammar(url):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 300, "temperature": 1.0, "seed": 5}
    r = post(url, "/v1/chat/completions", body | {"response_format": {"type": "json_object"},
                                                  "logit_bias": {CLOSE_OBJECT: 6, QUOTE: 3}})
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Code:", "max_tokens": 20, "seed": 3,
                                      "structured_outputs": {"regex": "[A-F]{3}-[0-9]{2}"}})
    import re

    assert re.fullmatch("[A-F]{3}-[0-9]{2}", r.json()["choices"][0]["text"])
    choices = ["yes", "no", "it depends"]
    seen = set()
    for seed in range(6):
        r = post(url, "/v1/chat/completions", body | {"seed": seed, "structured_outputs": {"choice": choices}})
        seen.add(r.json()["choices"][0]["message"]["content"])
    assert seen <= set(choices) and len(seen) > 1
    lark = 'start: "(" expr ")"\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]{1,3}/'
    r = post(url, "/v1/chat/completions", body | {"structured_outputs": {"grammar": lark},
                                                  "logit_bias": {CLOSE_PAREN: 6}})
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r.json()["choices"][0]["message"]["content"])
    gbnf = 'root ::= "v" [0-9] "." [0-9]'
    r = post(url, "/v1/chat/completions", body | {"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"v[0-9]\.[0-9]", r.json()["choices"][0]["message"]["content"])


def test_constrained_and_free_rows_share_a_batch(url):
    """Half the requests constrained, half not, at once: the free ones are unchanged by their
    neighbours (greedy text equals the same request alone)."""
    free = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = post(url, "/v1/chat/completions", free).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, url, "/v1/chat/completions",
                               free if i % 2 else _json_schema_body(i, SCHEMAS[i])) for i in range(8)]
        results = [f.result().json()["choices"][0]["message"]["content"] for f in futures]
    assert all(results[i] == alone for i in range(1, 8, 2))
    for i in range(0, 8, 2):
        jsonschema.validate(json.loads(results[i]), SCHEMAS[i])


def test_bad_words_never_appear(url):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    banned = [c for c in dict.fromkeys(text) if c.isascii() and c.isalnum()][:2]  # one byte, one token each
    assert banned
    again = post(url, "/v1/completions", body | {"bad_words": banned}).json()["choices"][0]["text"]
    assert again != text and not any(b in again for b in banned)


# -- tools --------------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}


def _check_calls(calls: list[dict]) -> None:
    assert calls
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMA_OF[c["name"]])
        assert c["id"] and len(c["id"]) == 9


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_have_valid_arguments(url, parallel):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "tools": TOOLS,
            "tool_choice": "required", "max_tokens": 600, "temperature": 1.0, "parallel_tool_calls": parallel,
            "logit_bias": {CLOSE_LIST: 4}}
    for seed in range(3):
        r = post(url, "/v1/chat/completions", body | {"seed": seed})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        calls = [{"id": c["id"], **c["function"]} for c in choice["message"]["tool_calls"]]
        _check_calls(calls)
        assert parallel or len(calls) == 1
        content, streamed, finish = stream_chat(url, body | {"seed": seed})  # the same tokens, as deltas
        assert finish == "tool_calls" and not content
        _check_calls(list(streamed.values()))
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [(c["name"], c["arguments"])
                                                                             for c in calls]


def test_named_function_streams_its_arguments(url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 300,
            "temperature": 1.0, "seed": 4}
    r = post(url, "/v1/chat/completions", body).json()["choices"][0]
    assert r["finish_reason"] == "stop"
    [call] = r["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    content, calls, finish = stream_chat(url, body)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and finish == "stop"
    assert calls[0]["arguments"] == call["function"]["arguments"]  # same seed, same arguments, in pieces


def test_a_conversation_with_tool_results_is_served(url):
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": "5"}]
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 5})
    assert r.status_code == 200, r.text
    without = post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages[:1], "max_tokens": 5})
    assert r.json()["usage"]["prompt_tokens"] > without.json()["usage"]["prompt_tokens"] + 20


# -- OpenAI's Responses API, through the official SDK's client.responses --------------------------

ADD_TOOL = {"type": "function", "name": "add", "description": "Add two numbers", "parameters": ADD}


def sdk(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_responses_plain_and_streamed_equal_the_chat_route(url):
    client = sdk(url)
    # Mixtral's template has no system turn: the instructions open the first user turn
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Be brief.\n\nHello"}],
                                          max_tokens=24, temperature=0)
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="Hello", max_output_tokens=24,
                                temperature=0)
    assert r.object == "response" and r.id.startswith("resp")
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    as_items = client.responses.create(model=MODEL, input=[
        {"role": "system", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
        max_output_tokens=24, temperature=0)
    assert as_items.output_text == r.output_text
    events = list(client.responses.create(model=MODEL, instructions="Be brief.", input="Hello",
                                          max_output_tokens=24, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{r.status}" and [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens


def test_responses_text_format_is_held_to_its_json_schema(url):
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    r = sdk(url).responses.create(model=MODEL, input="Weather in Paris?", text={"format": fmt}, max_output_tokens=200,
                                  temperature=0)
    jsonschema.validate(json.loads(r.output_text), WEATHER)
    assert r.text.format.type == "json_schema"
    chat = post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 200,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
            "name": "weather", "schema": WEATHER, "strict": True}}})
    assert r.output_text == chat.json()["choices"][0]["message"]["content"]


def test_responses_call_a_tool_and_take_its_result(url):
    client = sdk(url)
    ask = {"model": MODEL, "input": "What is 2 + 3?", "tools": [ADD_TOOL], "max_output_tokens": 300,
           "temperature": 0, "tool_choice": {"type": "function", "name": "add"}}
    r = client.responses.create(**ask)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), ADD)
    chat = post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "tools": TOOLS[1:],
        "tool_choice": {"type": "function", "function": {"name": "add"}}, "max_tokens": 300, "temperature": 0})
    assert [c["function"]["arguments"] for c in chat.json()["choices"][0]["message"]["tool_calls"]] == \
        [calls[0].arguments]
    events = list(client.responses.create(**ask, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [("add", calls[0].arguments)]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == calls[0].arguments
    follow = client.responses.create(model=MODEL, tools=[ADD_TOOL], max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": "What is 2 + 3?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "add", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}])
    assert follow.status in ("completed", "incomplete") and follow.usage.input_tokens > r.usage.input_tokens


@pytest.mark.parametrize(("extra", "param"), [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"reasoning": {"effort": "low"}}, "reasoning"), ({"input": ""}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"), ({"temperature": 3}, "temperature"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"tools": [ADD_TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0.type"),
])
def test_responses_bad_fields_are_400s_naming_them(url, extra, param):
    r = post(url, "/v1/responses", {"model": MODEL, "input": "x"} | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


# -- client libraries ---------------------------------------------------------------------------

class Forecast(BaseModel):
    city: str = Field(max_length=10)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


def test_openai_sdk_parse(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
    for seed in range(3):
        completion = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Forecast,
                                                   max_tokens=200, seed=seed)
        assert isinstance(completion.choices[0].message.parsed, Forecast)


def test_langchain_with_structured_output(url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key=API_KEY, max_tokens=200, seed=7)
    result = llm.with_structured_output(Forecast).invoke("The weather for the week, please.")
    assert isinstance(result, Forecast)


# -- lm-evaluation-harness ----------------------------------------------------------------------

QUESTIONS = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Paris is in", "choices": [" France", " Spain", " Italy", " Peru"], "answer": 0},
    {"question": "Water is", "choices": [" wet", " dry"], "answer": 0},
]
TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{extra}
"""


def _write_tasks(root) -> None:
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    mc = 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc'
    gen = ('doc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
           '  do_sample: false\nmetric_list:\n  - metric: exact_match')
    (root / "tiny_mc.yaml").write_text(TASKS.format(name="tiny_mc", data=data, output_type="multiple_choice",
                                                    extra=mc))
    (root / "tiny_gen.yaml").write_text(TASKS.format(name="tiny_gen", data=data, output_type="generate_until",
                                                     extra=gen))


def test_lm_eval_harness_scores_like_transformers(url, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    _write_tasks(tmp_path)
    results = simple_evaluate(
        model="local-completions", tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model={MODEL},base_url={url}/v1/completions,tokenizer={tiny_ckpt},num_concurrent=2,"
                   "max_retries=1,tokenized_requests=True",
        log_samples=True, batch_size=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    scored = 0
    for sample in results["samples"]["tiny_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            loglik = resp[0][0]  # each response: [(log-likelihood, is_greedy)]
            ctx = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            lsm = torch.log_softmax(reference_logits(str(tiny_ckpt), whole), dim=-1)
            expected = sum(lsm[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))
            assert loglik == pytest.approx(expected, abs=1e-3), (context, continuation)
            scored += 1
    assert scored == sum(len(q["choices"]) for q in QUESTIONS)
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    for sample in results["samples"]["tiny_gen"]:
        text = sample["resps"][0][0]
        ids = tok(sample["arguments"][0][0], add_special_tokens=False).input_ids
        greedy = reference_greedy(str(tiny_ckpt), ids, 8)
        if 2 in greedy:
            greedy = greedy[:greedy.index(2)]
        assert text == tok.decode(greedy, skip_special_tokens=True).split("\n")[0]


# -- prompt logprobs over HTTP ------------------------------------------------------------------

def test_scoring_call_returns_prompt_logprobs_with_offsets(url, tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    prompt = "Héllo wörld, scoring"
    ids = tok(prompt).input_ids
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True,
                                      "logprobs": 2, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    lsm = torch.log_softmax(reference_logits(str(tiny_ckpt), ids), dim=-1)
    expected = [lsm[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    # each offset is where the token's text starts in the echo (multi-byte characters share one)
    starts = [len(tok.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")) for k in range(len(ids))]
    assert lp["text_offset"] == starts
    assert r.json()["usage"]["completion_tokens"] == 0
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and all(str(t) in d for t, d in zip(ids[1:], plp[1:], strict=True))
