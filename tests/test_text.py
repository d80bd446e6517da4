import json

import pytest
import torch

import rateq
from rateq.text import token_windows


@pytest.mark.parametrize("alias, needle", [("austen-emma", "Emma Woodhouse"), ("austen-pp", "Elizabeth"),
                                           ("jargon", "hacker")])
def test_bundled_aliases(alias, needle):
    text = rateq.load_text(alias)
    assert len(text) > 400_000 and needle in text


def test_calibration_and_evaluation_texts_differ():
    assert rateq.load_text("austen-emma")[:5000] != rateq.load_text("austen-pp")[:5000]


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert rateq.load_text(str(tmp_path / "a.txt")) == "hello world"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert rateq.load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(rateq.RateQError, match="c.jsonl:1"):
        rateq.load_text(str(tmp_path / "c.jsonl"))


@pytest.mark.parametrize("spec", ["missing.txt", "no-such-alias", "hf:onlyname"])
def test_bad_specs_are_clear(spec):
    with pytest.raises(rateq.RateQError):
        rateq.load_text(spec)


def test_windows_are_seeded_and_distinct():
    ids = torch.arange(10_000)
    a = token_windows(ids, 5, 100, seed=3)
    assert torch.equal(a, token_windows(ids, 5, 100, seed=3))
    assert not torch.equal(a, token_windows(ids, 5, 100, seed=4))
    starts = a[:, 0]
    assert len(set(starts.tolist())) == 5 and torch.all(starts % 100 == 0)  # non-overlapping slots
    assert torch.equal(token_windows(ids, 2, 10, seed=None), ids[:20].view(2, 10))


def test_too_little_text_is_clear():
    with pytest.raises(rateq.RateQError, match="not enough text"):
        token_windows(torch.arange(1000), 3, 512)


@pytest.mark.parametrize("content, match", [(b"", "is empty"), (b" \n\t\n", "is empty"),
                                            (b"text\x00more", "is binary"), ("caf\xe9".encode("latin-1"), "not UTF-8")])
def test_files_that_hold_no_usable_text(tmp_path, content, match):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(rateq.RateQError, match=match):
        rateq.load_text(str(path))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(rateq.RateQError, match="holds no text"):
        rateq.load_text(str(tmp_path / "rows.jsonl"))


def test_a_folder_is_not_a_text_file(tmp_path):
    with pytest.raises(rateq.RateQError, match="is a folder"):
        rateq.load_text(str(tmp_path))


def test_negative_character_offsets_are_refused():
    with pytest.raises(rateq.RateQError, match="0 or more"):
        rateq.text_windows(None, "austen-pp", 1, 16, char_start=-5)


@pytest.mark.parametrize("alias, needle", [("kjv", "In the beginning God created"), ("python-docs", "interpreter"),
                                           ("python-code", "def ")])
def test_bundled_calibration_texts(alias, needle):
    text = rateq.load_text(alias)
    assert len(text) > 400_000 and needle in text


class _Bytes:
    """A tokenizer of one token per UTF-8 byte, as transformers' tokenizers are called."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt", verbose=False):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))])}


def test_mixed_text_draws_from_each_part_in_turn():
    from rateq.text import MIXED_TEXT

    tok = _Bytes()
    parts = MIXED_TEXT["mix"]
    assert rateq.DEFAULT_CALIBRATION_TEXT == "mix" and len(parts) == 4
    got = rateq.text_windows(tok, "mix", 6, 64, seed=3)
    assert got.shape == (6, 64)
    assert torch.equal(got, rateq.text_windows(tok, "mix", 6, 64, seed=3))
    # 6 windows over 4 parts: 2, 2, 1, 1, each drawn from its own part as a plain draw of that many would be
    start = 0
    for part, k in zip(parts, (2, 2, 1, 1)):
        assert torch.equal(got[start:start + k], rateq.text_windows(tok, part, k, 64, seed=3))
        start += k
    # held-out windows (skip) share no window with the drawn ones
    held = rateq.text_windows(tok, "mix", 6, 64, seed=3, skip=6)
    assert not any(torch.equal(h, g) for h in held for g in got)
    assert rateq.load_text("mix").startswith(rateq.load_text("austen-emma")[:1000])
