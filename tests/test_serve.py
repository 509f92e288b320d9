"""The OpenAI-compatible server, tested with the real `openai` client and raw HTTP on loopback."""

import json
import threading

import httpx
import openai
import pytest
from conftest import CALC_TOOL, REPLY

from nanoseek.infer.chat import split_thinking
from nanoseek.infer.engine import Engine
from nanoseek.serve.app import Limits, create_app
from nanoseek.serve.protocol import ReasoningSplitter, split_reasoning
from nanoseek.serve.server import ThreadedServer
from nanoseek.tools import calculator

KEY = "sekret-key"
THINK, ANSWER = split_thinking(REPLY)


@pytest.fixture(scope="module")
def server(chat_model):
    model, tok = chat_model
    engine = Engine(model, tok, max_seqs=8, context=256, max_waiting=64)
    app = create_app(engine, "nanoseek-test", api_key=KEY, limits=Limits(max_body_bytes=64_000, max_messages=16))
    with ThreadedServer(app) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, content="What is 2 + 2?", **kw):
    return client.chat.completions.create(model="nanoseek-test", messages=[{"role": "user", "content": content}],
                                          **kw)


def test_models_listing(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["nanoseek-test"]
    assert client.models.retrieve("nanoseek-test").id == "nanoseek-test"


def test_chat_separates_reasoning_from_content(client):
    r = ask(client, temperature=0, max_tokens=100)
    msg = r.choices[0].message
    assert msg.reasoning_content == THINK and msg.content == ANSWER
    assert "<think>" not in msg.content and "</think>" not in msg.reasoning_content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_with_usage(client):
    stream = ask(client, temperature=0, max_tokens=100, stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert (reasoning, content, finish) == (THINK, ANSWER, "stop")
    assert usage.completion_tokens > 10 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_n_stop_and_length(client):
    r = ask(client, temperature=0, max_tokens=100, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content == ANSWER for c in r.choices)
    stopped = ask(client, temperature=0, max_tokens=100, stop=["see"])
    assert stopped.choices[0].message.content == ANSWER[: ANSWER.index("see")]
    assert stopped.choices[0].finish_reason == "stop"
    short = ask(client, temperature=0, max_completion_tokens=5)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5


def test_seed_makes_sampling_reproducible(client):
    unseen = "an unseen question, so the model is unsure"
    a = ask(client, unseen, temperature=2, seed=11, max_tokens=40)
    b = ask(client, unseen, temperature=2, seed=11, max_tokens=40)
    c = ask(client, unseen, temperature=2, seed=12, max_tokens=40)
    text = [(x.choices[0].message.reasoning_content, x.choices[0].message.content) for x in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]


def test_legacy_completions(client, chat_model):
    _, tok = chat_model
    prompt = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    r = client.completions.create(model="nanoseek-test", prompt=prompt, max_tokens=200, temperature=0)
    assert r.choices[0].text == REPLY and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="nanoseek-test", prompt=prompt, max_tokens=200, temperature=0, stream=True) if c.choices)
    assert streamed == REPLY
    assert client.completions.create(model="nanoseek-test", prompt=prompt).usage.completion_tokens == 16


def test_reasoning_splitter_handles_any_chunking():
    text = "<think>a b</think>\n\nthe answer"
    for size in (1, 2, 3, 7, 100):
        s = ReasoningSplitter()
        parts = [s.feed(text[i: i + size]) for i in range(0, len(text), size)] + [s.flush()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == ("a b", "the answer")
    assert split_reasoning("no thinking here") == (None, "no thinking here")


def raw(server, method="POST", path="/v1/chat/completions", key=KEY, **kw):
    headers = kw.pop("headers", {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


GOOD = {"model": "nanoseek-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("case,status,param", [
    ("malformed", 400, None), ("wrong_type_n", 400, "n"), ("wrong_type_temperature", 400, "temperature"),
    ("empty_messages", 400, "messages"), ("unknown_role", 400, "messages.0.role"), ("unknown_model", 404, "model"),
    ("max_tokens_0", 400, "max_tokens"), ("max_tokens_huge", 400, "max_tokens"), ("n_too_large", 400, "n"),
    ("too_many_messages", 400, "messages"), ("over_context", 400, "messages"), ("no_key", 401, None),
    ("wrong_key", 401, None), ("oversized_body", 413, None), ("unknown_route", 404, None),
])
def test_bad_input_gets_openai_errors(server, case, status, param):
    body, kw = dict(GOOD), {}
    if case == "malformed":
        kw["content"], kw["headers"] = b'{"messages": [', {"Content-Type": "application/json"}
    elif case == "wrong_type_n":
        body["n"] = "two"
    elif case == "wrong_type_temperature":
        body["temperature"] = "hot"
    elif case == "empty_messages":
        body["messages"] = []
    elif case == "unknown_role":
        body["messages"] = [{"role": "wizard", "content": "hi"}]
    elif case == "unknown_model":
        body["model"] = "gpt-9"
    elif case == "max_tokens_0":
        body["max_tokens"] = 0
    elif case == "max_tokens_huge":
        body["max_tokens"] = 10**9
    elif case == "n_too_large":
        body["n"] = 99
    elif case == "too_many_messages":
        body["messages"] = [{"role": "user", "content": "hi"}] * 17
    elif case == "over_context":
        body["messages"] = [{"role": "user", "content": "What is 2 + 2? " * 100}]
    elif case == "oversized_body":
        body["messages"] = [{"role": "user", "content": "x" * 100_000}]
    if "content" not in kw:
        kw["json"] = body
    key = {"no_key": None, "wrong_key": "nope"}.get(case, KEY)
    path = "/v1/nothing" if case == "unknown_route" else "/v1/chat/completions"
    r = raw(server, path=path, key=key, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if case == "over_context":
        assert "256 tokens" in err["message"] and "more than fit" in err["message"]
    assert raw(server, "GET", "/health", key=None).json()["status"] == "ok"


def test_unknown_fields_are_ignored_and_health_needs_no_key(server):
    r = raw(server, json={**GOOD, "frequency_penalty": 0.5, "user": "abc", "something_new": [1, 2]})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert raw(server, "GET", "/health", key=None).status_code == 200
    assert raw(server, "GET", "/v1/models", key=None).status_code == 401


def test_many_streaming_clients_and_one_that_leaves(server):
    """32 concurrent streams (8 rows, the rest queued) all complete; one client leaving early
    does not stall the others, and its rows are freed."""
    results, errors = {}, []

    def stream_one(i: int, leave: bool):
        try:
            body = {**GOOD, "max_tokens": 100, "temperature": 0, "stream": True,
                    "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                content, done = "", False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    content += chunk["choices"][0]["delta"].get("content") or ""
                    if leave:
                        return  # close the connection mid-stream
                results[i] = (content, done)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=stream_one, args=(i, i == 3)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors
    assert len(results) == 31 and all(v == (ANSWER, True) for v in results.values())
    engine = server.server.config.app.state.engine
    for _ in range(100):
        if not engine.has_work():
            break
        threading.Event().wait(0.05)
    assert not engine.has_work()


def test_serve_command_prints_its_url_and_stops_cleanly_on_ctrl_c(tmp_path, chat_model):
    import signal
    import socket
    import subprocess
    import sys
    import time

    from nanoseek.checkpoint import save_checkpoint

    model, tok = chat_model
    save_checkpoint(tmp_path / "run", 1, model, tok, {"stage": "test"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(tmp_path / "run"), "--port", str(port),
                             "--eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://localhost:{port}/" in line
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and 'rel="manifest"' in page.text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_full_queue_answers_429(chat_model):
    model, tok = chat_model
    engine = Engine(model, tok, max_seqs=1, context=256, max_waiting=1)
    step = engine.step
    engine.step = lambda: (threading.Event().wait(0.02), step())[1]  # a slow model: the queue fills
    with ThreadedServer(create_app(engine)) as s:
        body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as running:
            for _ in range(500):  # the first request holds the only row
                if engine.running:
                    break
                threading.Event().wait(0.01)
            waiting = threading.Thread(target=httpx.post, args=(s.url + "/v1/chat/completions",),
                                       kwargs={"json": {**body, "stream": False}, "timeout": 60})
            waiting.start()
            for _ in range(200):
                if engine.waiting:
                    break
                threading.Event().wait(0.01)
            assert len(engine.waiting) == 1
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            lines = [line for line in running.iter_lines() if line.startswith("data: {")]
            assert json.loads(lines[-1][6:])["choices"][0]["finish_reason"] == "stop"
        waiting.join(timeout=60)
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


# ---- tools: the built-in calculator inside a response, the client's functions through `tools` ----

QUESTIONS = ["What is 12 + 30?", "What is 55 + 23 + 41?", "What is 40 + 45?"]


@pytest.fixture(scope="module")
def calc_server(calc_model):
    model, tok = calc_model
    engine = Engine(model, tok, max_seqs=8, context=512, speculative=True)
    with ThreadedServer(create_app(engine, "nanoseek-calc", api_key=KEY)) as s:
        yield s


@pytest.fixture
def calc_client(calc_server):
    return openai.OpenAI(base_url=calc_server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_the_calculator_runs_inside_a_chat_response(calc_client):
    """No tools in the request: the model's calculator calls run on the server, and each call
    and its output appear in reasoning_content; the response is not a tool call."""
    shown = 0
    for q in QUESTIONS:
        r = calc_client.chat.completions.create(model="nanoseek-calc", messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=120)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason in ("stop", "length") and not msg.tool_calls
        for block in msg.reasoning_content.split("<｜tool▁calls▁begin｜>")[1:]:
            args = block.split("<｜tool▁sep｜>")[1].split("<｜tool▁call▁end｜>")[0]
            assert f"<｜tool▁calls▁end｜><｜tool▁output▁begin｜>{calculator(args)}<｜tool▁output▁end｜>" in block
            shown += 1
    assert shown >= 2


def collect(stream):
    """(reasoning, content, tool_calls as (name, arguments), finish_reason) of a streamed reply."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in stream:
        for ch in chunk.choices:
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                name, args = calls.get(tc.index, ("", ""))
                calls[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
            finish = ch.finish_reason or finish
    return reasoning, content, [calls[k] for k in sorted(calls)], finish


@pytest.mark.parametrize("choice", ["auto", "named"])
def test_a_clients_function_round_trips_streaming_and_not(calc_client, choice):
    """The calculator offered as the client's own function: the call ends the response with
    message.tool_calls and finish_reason "tool_calls" (no call markup left in the text), the
    stream carries the same call in OpenAI's delta form, and a request carrying the tool's
    output goes on from it."""
    tool_choice = {"type": "function", "function": {"name": "calculator"}} if choice == "named" else "auto"
    ended = 0
    for q in QUESTIONS:
        kw = dict(model="nanoseek-calc", temperature=0, max_tokens=120, tools=[CALC_TOOL], tool_choice=tool_choice)
        messages = [{"role": "user", "content": q}]
        r = calc_client.chat.completions.create(messages=messages, **kw)
        c = r.choices[0]
        streamed = collect(calc_client.chat.completions.create(messages=messages, stream=True, **kw))
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        assert streamed == (c.message.reasoning_content or "", c.message.content or "", calls, c.finish_reason)
        if c.finish_reason != "tool_calls":
            continue
        ended += 1
        assert calls and calls[0][0] == "calculator" and c.message.tool_calls[0].id.startswith("call_")
        for text in (c.message.reasoning_content or "", c.message.content or ""):
            assert "<｜tool▁call" not in text and "<｜tool▁output" not in text
        messages += [{"role": "assistant", "content": c.message.content, "tool_calls": c.message.tool_calls,
                      "reasoning_content": c.message.reasoning_content},
                     *[{"role": "tool", "tool_call_id": t.id, "content": calculator(t.function.arguments)}
                       for t in c.message.tool_calls]]
        after = calc_client.chat.completions.create(messages=messages, **{**kw, "tool_choice": "auto"})
        assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert after.usage.prompt_tokens > r.usage.prompt_tokens
    assert ended >= (len(QUESTIONS) if choice == "named" else 1)


@pytest.mark.parametrize("tools,tool_choice,param", [
    ([{"type": "function", "function": {}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools.0.function.name"),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, "tools.0.type"),
    ([{"type": "function", "function": {"name": "f", "parameters": "not an object"}}], None,
     "tools.0.function.parameters"),
    ("not a list", None, "tools"),
    ([CALC_TOOL, CALC_TOOL], None, "tools"),
    (None, "required", "tool_choice"),
    ([CALC_TOOL], {"type": "function", "function": {"name": "weather"}}, "tool_choice"),
    ([CALC_TOOL], "sometimes", "tool_choice"),
])
def test_malformed_tools_get_a_400(calc_server, tools, tool_choice, param):
    body = {"model": "nanoseek-calc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if tools is not None:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    r = raw(calc_server, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"].startswith(param), err


def test_a_tool_message_continues_the_turn_that_called(calc_server, calc_model):
    """The prompt the server builds from an assistant's tool_calls and the tool's message is the
    chat template's: the call, then the output, and no new assistant turn."""
    _, tok = calc_model
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "12+30"}}
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": None, "reasoning_content": "12 + 30 = ", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r = raw(calc_server, json={"model": "nanoseek-calc", "messages": messages, "max_tokens": 8, "temperature": 0,
                               "tools": [CALC_TOOL]})
    assert r.status_code == 200, r.text
    expected = tok.encode(tok.render_chat(messages, add_generation_prompt=True, tools=[CALC_TOOL]))
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    assert tok.decode(expected[-12:], keep_special=True).endswith(
        "12+30<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜tool▁output▁begin｜>42<｜tool▁output▁end｜>")


def _call(i: int) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": "calculator", "arguments": f"{i}+1"}}


ASKED = {"role": "user", "content": "What is 1 + 1 and 2 + 1?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [_call(1), _call(2)]}


def _answer(i: int | None) -> dict:
    return {"role": "tool", "content": "2", **({} if i is None else {"tool_call_id": f"call_{i}"})}


@pytest.mark.parametrize("messages,param,named", [
    ([ASKED, CALLED, _answer(1), _answer(None)], "messages.3.tool_call_id", "tool_call_id"),
    ([ASKED, CALLED, _answer(1), _answer(9)], "messages.3.tool_call_id", "'call_9'"),
    ([ASKED, _answer(1)], "messages.1.tool_call_id", "'call_1'"),
    ([ASKED, CALLED, _answer(2), _answer(1), ASKED, _answer(1)], "messages.5.tool_call_id", "'call_1'"),
    ([ASKED, CALLED], "messages.1.tool_calls", "'call_1', 'call_2'"),
    ([ASKED, CALLED, _answer(2), ASKED], "messages.1.tool_calls", "'call_1'"),
    ([ASKED, CALLED, _answer(1), {"role": "assistant", "content": "and"}], "messages.1.tool_calls", "'call_2'"),
    ([ASKED, {**CALLED, "tool_calls": [{**_call(1), "id": None}]}, _answer(1)], "messages.1.tool_calls.0.id", ""),
])
def test_tool_messages_that_answer_no_call_or_calls_left_unanswered_get_a_400(calc_client, messages, param, named):
    """As OpenAI's API: each tool message answers a call of the assistant message it follows, and
    each call of an assistant message is answered before the next other message or the end."""
    with pytest.raises(openai.BadRequestError) as caught:
        calc_client.chat.completions.create(model="nanoseek-calc", messages=messages, tools=[CALC_TOOL], max_tokens=4)
    e = caught.value
    assert e.status_code == 400 and e.type == "invalid_request_error" and e.param == param, e.body
    assert named in e.body["message"] and "\n" not in e.body["message"]


def test_tool_messages_answering_every_call_in_any_order_are_accepted(calc_client):
    for answers in ([_answer(1), _answer(2)], [_answer(2), _answer(1)]):
        r = calc_client.chat.completions.create(model="nanoseek-calc", messages=[ASKED, CALLED, *answers],
                                                tools=[CALC_TOOL], max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    done = [ASKED, CALLED, _answer(1), _answer(2), {"role": "assistant", "content": "2 and 3"}, ASKED]
    r = calc_client.chat.completions.create(model="nanoseek-calc", messages=done, tools=[CALC_TOOL], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
