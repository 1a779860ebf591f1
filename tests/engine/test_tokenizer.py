"""Tokenization, the walkthrough's golden tokens, and streaming detokenization of multi-byte text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REFERENCE_TEXT, REFERENCE_TOKENS
from gpt2onnx.engine.tokenizer import Tokenizer

REFERENCE_CONTINUATION = [314, 716, 257, 845, 12356, 290, 12356, 1048, 11, 290]
REAL_MODEL_ENV = "GPT2_ONNX_REAL_GPT2"  # a folder with the real GPT-2 weights (HF checkpoint or exported)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir, vocab):
    return Tokenizer(tokenizer_dir / "tokenizer.json", vocab[1], vocab[1])


def test_walkthrough_reference_text_tokenizes_to_golden_ids(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir / "tokenizer.json", 50256, 50256)
    assert tok.to_tokens(REFERENCE_TEXT) == REFERENCE_TOKENS
    assert tok.to_tokens(REFERENCE_TEXT, prepend_bos=False) == REFERENCE_TOKENS[1:]
    assert tok.to_string(REFERENCE_TOKENS) == "<|endoftext|>" + REFERENCE_TEXT
    assert tok.to_str_tokens(REFERENCE_TEXT)[:4] == ["<|endoftext|>", "I", " am", " an"]


def test_walkthrough_greedy_continuation_with_real_weights(tmp_path):
    folder = os.environ.get(REAL_MODEL_ENV)
    if not folder:
        pytest.skip(
            f"set {REAL_MODEL_ENV} to a folder with the real GPT-2 weights (none exist on this machine)"
        )
    from gpt2onnx.engine.contract import MANIFEST_FILE
    from gpt2onnx.engine.engine import Engine

    if not (Path(folder) / MANIFEST_FILE).is_file():
        from conftest import export_folder

        folder = export_folder(folder, tmp_path / "gpt2")
    engine = Engine.load(folder, provider="cpu")
    c = engine.generate(REFERENCE_TEXT, max_new_tokens=10).completions[0]
    assert c.prompt_token_ids == REFERENCE_TOKENS
    assert (
        c.token_ids == REFERENCE_CONTINUATION and c.text == " I am a very talented and talented person, and"
    )


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 🙂🚀 mixed ✓ text", "naïve café — “quotes”"]
)
def test_streaming_never_emits_broken_utf8(tokenizer, text):
    ids = tokenizer.to_tokens(text, prepend_bos=False)
    decoder = tokenizer.decode_stream()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces


def test_a_split_character_waits_for_its_last_byte(tokenizer):
    ids = tokenizer.to_tokens("🙂", prepend_bos=False)
    if len(ids) < 2:
        pytest.skip("this tokenizer keeps the emoji in one token")
    decoder = tokenizer.decode_stream()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🙂"


def test_eos_is_not_part_of_streamed_text(tokenizer, vocab):
    decoder = tokenizer.decode_stream()
    assert decoder.push(vocab[1]) == ""


def test_walkthrough_example_runs(tiny_fp32):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "walkthrough.py"), "--model", str(tiny_fp32)],
        capture_output=True,
        text=True,
    )
    assert "logits shape: (1, " in proc.stdout and "continuation ids:" in proc.stdout
    # the last step needs an inspectable folder (tests/engine/test_run_with_cache.py runs it whole)
    assert proc.returncode == 1 and "exported without --inspect" in proc.stderr and "--inspect" in proc.stderr


def test_completion_text_is_what_the_stream_gives(tokenizer, vocab):
    """generate() without stop strings makes a row's text in one call after the loop; it must be
    exactly the streamed text: random ids (many end or break mid-character), the EOS among them."""
    import numpy as np

    rng = np.random.default_rng(0)
    split = tokenizer.to_tokens("ok 𝔘", prepend_bos=False)  # a 4-byte character no merge covers
    samples = [split[:-1], split[:-1] + [vocab[1]], split]  # ends mid-character, then not
    for _ in range(500):
        ids = rng.integers(0, vocab[0], size=rng.integers(1, 30)).tolist()
        if rng.random() < 0.2:
            ids.insert(int(rng.integers(len(ids))), vocab[1])
        samples.append(ids)
    held_tails = 0
    for ids in samples:
        decoder = tokenizer.decode_stream()
        streamed = "".join(decoder.push(i) for i in ids)
        assert tokenizer.completion_text(ids) == streamed, ids
        held_tails += tokenizer.to_string(ids).endswith("\ufffd")
    assert held_tails > 0, "no sample ended mid-character: the fallback went untested"
