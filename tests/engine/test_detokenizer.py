"""Incremental detokenisation and stop strings on the byte-level tokenizer of the tiny model."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer, TextStream
from engine.factory import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def stream(tok, text, stop=(), include=False):
    ids = tok(text, add_special_tokens=False).input_ids
    ts = TextStream(IncrementalDetokenizer(tok, [1]), stop, include)
    deltas, stopped = [], False
    for i in ids:
        step = ts.add(i)
        deltas.append(step.delta)
        if step.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(ts.flush())
    return deltas, ts.text, stopped


def test_multibyte_characters_are_never_split(tok):
    text = "héllo wörld ✓ 日本語 🙂"
    deltas, final, _ = stream(tok, text)
    assert len(tok(text, add_special_tokens=False).input_ids) > len(text)  # some characters span tokens
    assert "".join(deltas) == final == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_half_emitted(tok):
    deltas, final, stopped = stream(tok, "abc<|end|>def", stop=("<|end|>",))
    assert stopped and final == "abc" and "".join(deltas) == "abc"
    deltas, final, _ = stream(tok, "abc<|end|>def", stop=("<|end|>",), include=True)
    assert final == "abc<|end|>"


def test_false_start_of_a_stop_string_is_released(tok):
    deltas, final, stopped = stream(tok, "a<|en x<|end", stop=("<|end|>",))
    assert not stopped and "".join(deltas) == final == "a<|en x<|end"
    assert deltas[-1] == "<|end"  # held back until the stream ended


def test_earliest_of_several_stops_wins(tok):
    _, final, stopped = stream(tok, "one two three", stop=("three", "two"))
    assert stopped and final == "one "
