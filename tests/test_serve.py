"""`jaxground.serve` through the official `openai` client, on a briefly trained shapes model:
plain, streamed, logprobs, the grounding extension, batching (answers equal alone and in a
batch), bad input, API keys, client disconnects, and the command line."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import http.client as http_client
import json
import os
import subprocess
import sys
import time

import numpy as np
import openai
import pytest
from PIL import Image
from urllib.parse import urlsplit

import jaxground
from serving import (KEY, MAX_TOKENS, REPO, data_url, http, images, served, shared_workdir,
                     user)

# One worker runs them all: the server fixture (load + compile) is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serve")]
BATCH = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(workdir):
    from jaxground.serve import Limits, ServeShapes

    shapes = ServeShapes(batch_sizes=(1, BATCH), max_tokens=MAX_TOKENS, window_s=0.05)
    with served(workdir, shapes, dict(text_only=False, guided=False), api_key=KEY,
                limits=Limits(max_tokens=MAX_TOKENS, max_image_bytes=200_000),
                max_body_bytes=2_000_000) as s:
        yield s


@pytest.fixture(scope="module")
def pictures(workdir):
    return [data_url(p) for p in images(workdir)]


def ask(client, model, image=None, question="Describe the image.", **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[user(question, image)],
                                          max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


def test_a_plain_answer_is_the_libraries_greedy_answer(server, pictures, workdir):
    """The server's text, tokens, log p and grounding are `jaxground.generate`'s for the
    prompt the evaluation protocol builds (single turn: the evaluation's own encoding)."""
    client, name = server.client(), server.loaded.model_name
    reply = ask(client, name, pictures[0], logprobs=True)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    engine = server.engine
    proc = engine.processor
    ids = proc.encode("Describe the image.")["input_ids"]
    assert proc.encode_chat([("Describe the image.", "")]) == ids
    px = proc.pixel_values([Image.open(images(workdir)[0])])
    gen = jaxground.generate(engine.model, np.asarray([ids]), px, max_new_tokens=MAX_TOKENS,
                             eos_token_id=proc.tokenizer.eos_token_id)
    n = int(gen.lengths[0])
    tokens = np.asarray(gen.tokens)[0, :n].tolist()
    eos = tokens[-1] == proc.tokenizer.eos_token_id
    assert choice.finish_reason == ("stop" if eos else "length")
    answer = tokens[:-1] if eos else tokens
    assert choice.message.content == proc.tokenizer.decode(answer, skip_special_tokens=True)
    ground = choice.grounding
    assert [g["token_id"] for g in ground] == answer
    assert "".join(g["token"] for g in ground) == choice.message.content
    np.testing.assert_allclose([g["logit"] for g in ground],
                               np.asarray(gen.grounding)[0, :len(answer)], atol=1e-4)
    np.testing.assert_allclose([c.logprob for c in choice.logprobs.content],
                               np.asarray(gen.logprobs)[0, :len(answer)], atol=1e-4)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == n
    assert reply.usage.total_tokens == len(ids) + n
    assert reply.model == name and reply.object == "chat.completion"


def test_a_streamed_answer_arrives_token_by_token(server, pictures):
    client, name = server.client(), server.loaded.model_name
    whole = ask(client, name, pictures[1]).choices[0]
    chunks = list(ask(client, name, pictures[1], stream=True,
                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    token_chunks = [c for c in chunks if c.choices and getattr(c.choices[0], "grounding", None)]
    assert len(token_chunks) == len(whole.grounding) > 1  # one chunk per token
    assert [c.choices[0].grounding[0] for c in token_chunks] == whole.grounding
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(
        whole.grounding)


def test_logprobs_in_openais_shape(server, pictures):
    client, name = server.client(), server.loaded.model_name
    choice = ask(client, name, pictures[2], logprobs=True, top_logprobs=3).choices[0]
    content = choice.logprobs.content
    assert len(content) == len(choice.grounding) > 0
    for entry, g in zip(content, choice.grounding):
        assert entry.token == g["token"] and entry.bytes == list(g["token"].encode())
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(top[0], abs=1e-6)
        assert entry.top_logprobs[0].token.strip() == entry.token.strip()
        assert np.exp(top).sum() <= 1 + 1e-5
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        ask(client, name, pictures[2], logprobs=True, top_logprobs=21)


def test_the_grounding_extension_flags_object_words_and_gives_heatmaps(server, pictures):
    client, name = server.client(), server.loaded.model_name
    objects = server.engine.flag_mask
    everything = ask(client, name, pictures[3], extra_body={
        "flag_threshold": 1e3, "grounding_patches": True}).choices[0]
    nothing = ask(client, name, pictures[3], extra_body={"flag_threshold": -1e3}).choices[0]
    assert everything.message.content == nothing.message.content
    tokens = everything.grounding
    assert any(objects[g["token_id"]] for g in tokens)
    assert any(not objects[g["token_id"]] for g in tokens)
    for g in tokens:  # a huge threshold flags exactly the scored object words
        assert g["flagged"] == (objects[g["token_id"]] and g["logit"] is not None)
    assert not any(g["flagged"] for g in nothing.grounding)
    assert everything.grounding_threshold == 1e3
    patches = everything.grounding_patches
    k = server.engine.model.config.image_seq_length
    assert patches["grid"] ** 2 == k
    assert len(patches["scores"]) == len(tokens)
    for g, s in zip(tokens, patches["scores"]):
        assert (s is None) == (g["logit"] is None)
        assert s is None or (len(s) == k and np.isfinite(s).all() and np.ptp(s) > 0)


def test_guided_requests_decode_as_the_library_does(server, pictures, workdir):
    """The `guidance` extension is grounding-guided decoding with the object words as the
    bonus tokens, as `evaluate` runs it."""
    client, name, engine = server.client(), server.loaded.model_name, server.engine
    guided = ask(client, name, pictures[4], extra_body={"guidance": 3.0}).choices[0]
    proc = engine.processor
    ids = np.asarray([proc.encode_chat([("Describe the image.", "")])])
    px = proc.pixel_values([Image.open(images(workdir)[4])])
    gen = jaxground.generate(engine.model, ids, px, max_new_tokens=MAX_TOKENS,
                             eos_token_id=proc.tokenizer.eos_token_id, guidance=3.0,
                             guidance_tokens=np.flatnonzero(engine.flag_mask))
    answer = [t for t in np.asarray(gen.tokens)[0, :int(gen.lengths[0])].tolist()
              if t != proc.tokenizer.eos_token_id]
    assert [g["token_id"] for g in guided.grounding] == answer
    with pytest.raises(openai.BadRequestError, match="guidance"):
        ask(client, name, None, question="Hello", extra_body={"guidance": 1.0})


def _requests(pictures):
    """16 different requests: images, questions, greedy and seeded sampling, budgets."""
    questions = ["Describe the image.", "What shapes are there?", "Is there a red circle?",
                 "Describe the image briefly."]
    out = []
    for i in range(BATCH):
        kw = dict(image=pictures[i % len(pictures)], question=questions[i % 4],
                  max_tokens=MAX_TOKENS - (i % 3) * 5, logprobs=True)
        if i % 2:
            kw.update(temperature=0.8, top_p=0.9, seed=100 + i)
        out.append(kw)
    return out


def test_concurrent_requests_get_the_answers_they_get_alone(server, pictures):
    client, name = server.client(), server.loaded.model_name
    requests = _requests(pictures)
    alone = [ask(client, name, **r).choices[0] for r in requests]
    batches_before = server.engine.stats["batches"]
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        together = list(pool.map(lambda r: ask(client, name, **r).choices[0], requests))
    batches = server.engine.stats["batches"] - batches_before
    assert batches < BATCH / 2, f"{BATCH} concurrent requests ran in {batches} batches"
    for r, a, b in zip(requests, alone, together):
        assert a.message.content == b.message.content, r
        assert len(a.grounding) <= r["max_tokens"]
        np.testing.assert_allclose([c.logprob for c in a.logprobs.content],
                                   [c.logprob for c in b.logprobs.content], atol=1e-4)
        np.testing.assert_allclose([g["logit"] for g in a.grounding],
                                   [g["logit"] for g in b.grounding], atol=1e-4)
    sampled = [a.message.content for r, a in zip(requests, alone) if r.get("seed")]
    greedy = [a.message.content for r, a in zip(requests, alone) if not r.get("seed")]
    assert len(set(sampled)) > 1 and all(greedy)


def test_stop_strings_and_text_only_requests(server, pictures):
    client, name = server.client(), server.loaded.model_name
    full = ask(client, name, pictures[0], extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == MAX_TOKENS
    text = full.choices[0].message.content
    words = text.split()
    stop = " " + words[2]  # cut before the third word
    cut = ask(client, name, pictures[0], stop=[stop, "zzz"], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.usage.completion_tokens < MAX_TOKENS  # stopped in the loop, not after it
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(
        client, name, pictures[0], stop=stop, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == cut.choices[0].message.content
    plain = ask(client, name, None, question="Hello there")
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert all(g["logit"] is None for g in plain.choices[0].grounding)  # nothing to ground


def test_multi_turn_prompts_follow_the_conversation_format(server):
    proc = server.engine.processor
    eos = proc.tokenizer.eos_token
    text = proc.chat_text([("q1", "a1"), ("q2", "")])
    assert text == f"USER: <image>\nq1 ASSISTANT: a1{eos}USER: q2 ASSISTANT:"  # hf template
    from jaxground.data.processor import TEMPLATES, VICUNA_SYSTEM

    proc.template, hf = TEMPLATES["vicuna_v1"], proc.template
    try:
        assert proc.chat_text([("q1", "a1"), ("q2", "")]) == (
            f"{VICUNA_SYSTEM} USER: <image>\nq1 ASSISTANT: a1{eos}USER: q2 ASSISTANT:")
        assert proc.chat_text([("q", "")], system="Be brief.", image=False) == (
            "Be brief. USER: q ASSISTANT:")
    finally:
        proc.template = hf


def _noise_png(side: int) -> str:
    rng = np.random.default_rng(0)
    return data_url(Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8)))


BAD = [  # (body change or raw body, status, text in the message)
    (b"{not json", 400, "not valid JSON"),
    ({"messages": None}, 400, "messages"),
    ({"model": None}, 400, "model parameter"),
    ({"model": "gpt-4o"}, 404, "does not exist"),
    ({"image": "data:text/plain;base64,aGVsbG8="}, 400, "data:image"),
    ({"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, 400,
     "cannot be decoded"),
    ({"image": "https://example.com/cat.png"}, 400, "fetches nothing"),
    ({"image": "big"}, 413, "limit"),
    ({"question": " ".join(["circle"] * 400)}, 400, "prompt is"),
    ({"max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "start and end"),
    ({"messages": [{"role": "user", "content": "what is <image>?"}]}, 400, "image_url parts"),
]


@pytest.mark.parametrize("change,status,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_gets_an_openai_error_and_the_server_goes_on(server, pictures, change,
                                                                status, message):
    name = server.loaded.model_name
    body = {"model": name, "max_tokens": 4, "messages": [user("Describe.", pictures[0])]}
    if isinstance(change, dict):
        change = dict(change)
        if "image" in change:
            url = change.pop("image")
            body["messages"] = [user("Describe.", _noise_png(400) if url == "big" else url)]
        if "question" in change:
            body["messages"] = [user(change.pop("question"), pictures[0])]
        body.update(change)
        body = {k: v for k, v in body.items() if v is not None}
        raw = json.dumps(body).encode()
    else:
        raw = change
    code, reply = http(server.url, "POST", "/v1/chat/completions", raw)
    assert code == status, reply
    error = reply["error"]
    assert message in error["message"] and error["type"]
    good = ask(server.client(), name, pictures[0], max_tokens=2)
    assert good.choices[0].message.content


def test_body_size_cap(server):
    code, reply = http(server.url, "POST", "/v1/chat/completions", b"x" * 2_000_001)
    assert code == 413 and "limit" in reply["error"]["message"]


def test_api_key(server, pictures):
    name = server.loaded.model_name
    for key in ("wrong", None):
        with pytest.raises(openai.AuthenticationError):
            ask(server.client(key=key), name, pictures[0], max_tokens=2)
    code, reply = http(server.url, "GET", "/v1/models", key=None)
    assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    assert [m.id for m in server.client().models.list()] == [name]
    assert http(server.url, "GET", "/health", key=None)[1]["status"] == "ok"


def test_a_client_that_leaves_mid_stream_frees_its_row(server, pictures, monkeypatch):
    """The job is stopped inside the decode loop (fewer tokens than asked for) and the
    next request is served."""
    from jaxground.serve import engine as engine_lib

    taken = []
    original = engine_lib.Job.take

    def slow_take(job, step, row):  # ~30 ms a token: the client can leave mid-answer
        time.sleep(0.03)
        original(job, step, row)
        taken.append(len(job.token_ids))

    monkeypatch.setattr(engine_lib.Job, "take", slow_take)
    cancelled = server.engine.stats["cancelled"]
    body = {"model": server.loaded.model_name, "stream": True, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "messages": [user("Describe the image.", pictures[0])]}
    parts = urlsplit(server.url)
    conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    got = []
    while len(got) < 3:  # the role chunk and two tokens
        line = response.readline()
        assert line, "the stream ended early"
        got += [line] if line.startswith(b"data:") else []
    conn.close()  # the client leaves
    deadline = time.monotonic() + 10
    while server.engine.stats["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the job was not cancelled"
        time.sleep(0.05)
    assert max(taken) < MAX_TOKENS
    monkeypatch.undo()
    assert ask(server.client(), server.loaded.model_name, pictures[0],
               max_tokens=2).choices[0].message.content


def test_the_command_line_serves(workdir, pictures):
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxground.serve", "--workdir", workdir, "--port", "0",
         "--batch_sizes", "1", "--max_tokens", "8", "--warm_up", "none"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("serving "):
                url = line.split(" on ")[1].strip().rstrip("/")
                break
        assert url and url.startswith("http://127.0.0.1:"), "no 'serving' line"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = ask(client, os.path.basename(workdir), pictures[0], max_tokens=8)
        assert reply.choices[0].message.content
        assert "<!DOCTYPE html>" in http(url, "GET", "/")[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "jaxground.serve", "--workdir",
                          workdir + "-missing"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert bad.returncode != 0 and "does not exist" in bad.stderr
