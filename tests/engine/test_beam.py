"""Beam search against transformers' generate(num_beams=k, do_sample=False) on the same weights:
tokens and scores, every early_stopping value, several length penalties, num_return_sequences,
beams that end early (a model whose EOS is a token it often says), max_new_tokens reached,
several prompts in one call, beams beside other requests in the batch; and bad arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES_DIR, export_folder, make_varied_model, save_hf_folder
from gpt2onnx.engine.beam import BeamConfig, BeamSearch, top
from gpt2onnx.engine.contract import InputError
from gpt2onnx.engine.engine import Engine

TIE = 1e-4  # hypotheses whose scores are this close may come out in either order (engine/beam.py)


def hf_beams(model, prompt: list[int], new: int, k: int, lp: float, es, n: int, eos: int):
    """transformers' best n hypotheses: (new tokens, EOS included when it ended; score)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, num_beams=k, do_sample=False,
                             length_penalty=lp, early_stopping=es, num_return_sequences=n,
                             return_dict_in_generate=True, output_scores=True, pad_token_id=eos,
                             eos_token_id=eos)  # fmt: skip
    result = []
    for i in range(n):
        seq = out.sequences[i, len(prompt) :].tolist()
        if eos in seq:
            seq = seq[: seq.index(eos) + 1]
        result.append((seq, float(out.sequences_scores[i])))
    return result


def assert_same_beams(ours, theirs) -> None:
    """Equal hypotheses in order and scores within 1e-3; where the order differs, the scores
    must tie (within TIE): a near-tie, not a different search."""
    assert len(ours) == len(theirs)
    for (seq, score), (their_seq, their_score) in zip(ours, theirs):
        assert abs(score - their_score) < 1e-3, (ours, theirs)
        if seq != their_seq:
            tied = [s for s, sc in theirs if abs(sc - score) < TIE]
            assert seq in tied, f"not a tie:\nours   {ours}\ntheirs {theirs}"


def ours_of(completion):
    return [(b.token_ids, b.score) for b in completion.beams]


@pytest.fixture(scope="module")
def varied(vocab):
    return make_varied_model(vocab)


@pytest.fixture(scope="module")
def engine(varied_shared) -> Engine:
    return Engine.load(varied_shared, provider="cpu", max_batch=16)


@pytest.fixture(scope="module")
def eos_model(vocab, tokenizer_dir, tmp_path_factory):
    """The varied model with its EOS set to a token its beams often say, so beams end early."""
    model = make_varied_model(vocab)
    prompt = [17, 3000, 4000, 12, 9]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                pad_token_id=vocab[1])[0, len(prompt) :].tolist()  # fmt: skip
    eos = greedy[3]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    folder = save_hf_folder(model, tmp_path_factory.mktemp("eos") / "hf", tokenizer_dir)
    out = export_folder(folder, tmp_path_factory.mktemp("eos") / "shared", kv_cache="shared")
    return model, Engine.load(out, provider="cpu", max_batch=16), eos, prompt


CASES = [  # (k, length_penalty, early_stopping, num_return_sequences, prompt length, new tokens)
    (2, 1.0, False, 1, 5, 12), (3, 0.0, True, 3, 1, 9), (4, -0.5, "never", 2, 9, 16),
    (5, 2.0, False, 5, 3, 7), (6, 1.0, True, 1, 12, 15), (7, -1.0, False, 4, 2, 11),
    (8, 1.0, "never", 8, 6, 14), (8, 0.5, True, 3, 4, 1),
]  # fmt: skip


@pytest.mark.parametrize("k, lp, es, n, length, new", CASES)
def test_tokens_and_scores_are_transformers(engine, varied, vocab, k, lp, es, n, length, new):
    prompt = np.random.default_rng(k * 100 + length).integers(0, vocab[0], length).tolist()
    got = engine.generate(prompt, max_new_tokens=new, num_beams=k, length_penalty=lp, early_stopping=es,
                          num_return_sequences=n).completions[0]  # fmt: skip
    want = hf_beams(varied, prompt, new, k, lp, es, n, vocab[1])
    assert_same_beams(ours_of(got), want)
    assert got.token_ids == got.beams[0].token_ids and got.text == got.beams[0].text


@pytest.mark.parametrize("es", [False, True, "never"])
@pytest.mark.parametrize("lp", [1.0, 0.0, -0.7, 1.8])
def test_beams_that_end_early(eos_model, es, lp):
    model, engine, eos, prompt = eos_model
    ended = []
    for k, n, new in ((3, 3, 12), (6, 6, 18)):
        got = engine.generate(prompt, max_new_tokens=new, num_beams=k, length_penalty=lp, early_stopping=es,
                              num_return_sequences=n).completions[0]  # fmt: skip
        assert_same_beams(ours_of(got), hf_beams(model, prompt, new, k, lp, es, n, eos))
        ended += [b for b in got.beams if b.finish_reason == "eos" and b.token_ids[-1] == eos]
    assert ended  # the case this test is for


def test_ended_beams_across_prompts(eos_model, vocab):
    """Several prompts, some of whose beams end at the EOS and some that run to max_new_tokens."""
    model, engine, eos, prompt = eos_model
    rng = np.random.default_rng(4)
    prompts = [prompt] + [rng.integers(0, vocab[0], n).tolist() for n in (3, 8, 1)]
    completions = engine.generate(prompts, max_new_tokens=14, num_beams=4, num_return_sequences=4).completions
    reasons = set()
    for p, got in zip(prompts, completions):
        assert_same_beams(ours_of(got), hf_beams(model, p, 14, 4, 1.0, False, 4, eos))
        reasons |= {b.finish_reason for b in got.beams}
        assert got.finish_reason == got.beams[0].finish_reason
    assert reasons == {"eos", "length"}


def test_prompts_of_different_lengths_in_one_call_are_transformers_batch(engine, varied, vocab):
    """One call, four prompts of different lengths, each with its own beams (32 rows would not
    fit: max_batch 16, so they also queue for their slots); against transformers' one batched
    call (left-padded), prompt by prompt."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, vocab[0], n).tolist() for n in (2, 9, 5, 13)]
    got = engine.generate(prompts, max_new_tokens=10, num_beams=5, num_return_sequences=2).completions
    width = max(map(len, prompts))
    ids = torch.tensor([[vocab[1]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = varied.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=5, do_sample=False,
                              num_return_sequences=2, return_dict_in_generate=True, output_scores=True,
                              pad_token_id=vocab[1])  # fmt: skip
    for i, completion in enumerate(got):
        want = [
            (out.sequences[2 * i + j, width:].tolist(), float(out.sequences_scores[2 * i + j]))
            for j in (0, 1)
        ]
        assert_same_beams(ours_of(completion), want)


def test_beams_beside_other_requests(engine, vocab):
    """Beam searches and greedy requests share the running batch: every one gets what it gets alone."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, vocab[0], n).tolist() for n in (4, 7, 2, 6)]
    alone_greedy = [engine.generate(p, max_new_tokens=9).completions[0].token_ids for p in prompts[:2]]
    alone_beams = [ours_of(engine.generate(p, max_new_tokens=9, num_beams=3, num_return_sequences=3)
                           .completions[0]) for p in prompts[2:]]  # fmt: skip
    handles = [engine.submit(p, max_new_tokens=9, stream=False) for p in prompts[:2]]
    beams = engine.generate(prompts[2:], max_new_tokens=9, num_beams=3, num_return_sequences=3).completions
    assert [h.result().token_ids for h in handles] == alone_greedy
    for got, alone in zip(beams, alone_beams):
        assert [s for s, _ in ours_of(got)] == [s for s, _ in alone]
        np.testing.assert_allclose([s for _, s in ours_of(got)], [s for _, s in alone], atol=1e-5)


def test_one_beam_is_greedy(engine, vocab):
    prompt = [5, 6, 7]
    greedy = engine.generate(prompt, max_new_tokens=8).completions[0]
    one = engine.generate(prompt, max_new_tokens=8, num_beams=1).completions[0]
    assert one.token_ids == greedy.token_ids and one.beams is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_beams": 17}, "num_beams must be an integer from 1 to 16"),
        ({"num_beams": 0}, "num_beams must be"),
        ({"num_beams": 2.5}, "num_beams must be"),
        ({"num_beams": 3, "num_return_sequences": 4}, "num_return_sequences must be an integer from 1 to num_beams"),
        ({"num_return_sequences": 2}, "num_return_sequences must be an integer from 1 to num_beams (1)"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping must be True, False or 'never'"),
        ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty must be a finite number"),
        ({"num_beams": 2, "temperature": 0.7}, "drop the sampling settings"),
        ({"num_beams": 2, "top_p": 0.9}, "drop the sampling settings"),
        ({"num_beams": 2, "repetition_penalty": 1.2}, "drop the sampling settings"),
        ({"num_beams": 2, "stop": "\n"}, "stop strings do not apply to beam search"),
    ],
)  # fmt: skip
def test_bad_beam_arguments_are_named(engine, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.generate([1, 2, 3], max_new_tokens=4, **kwargs)


def test_beams_need_the_shared_cache(varied_fp32):
    engine = Engine.load(varied_fp32, provider="cpu")
    with pytest.raises(InputError, match="beam search needs the shared cache"):
        engine.generate([1, 2], max_new_tokens=3, num_beams=2)


def test_top_takes_equal_scores_in_index_order():
    scores = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.5], np.float32)
    assert top(scores, 3).tolist() == [1, 3, 2]
    assert top(scores, 6).tolist() == [1, 3, 2, 4, 0, 5]


def test_the_first_step_forks_beam_zero():
    search = BeamSearch(BeamConfig(3), max_new_tokens=5, eos_id=0)
    logits = np.log(np.array([[0.1, 0.5, 0.3, 0.1]] * 3, np.float32))
    parents, tokens = search.step(logits)
    assert parents.tolist() == [0, 0, 0] and tokens.tolist() == [1, 2, 3]  # EOS (0) ties token 3: ended


@pytest.mark.skipif(not (FIXTURES_DIR / "pydocs-gpt2-4l").is_dir(), reason="../shared/fixtures is absent")
def test_trained_model_is_transformers(tmp_path):
    """Real weights (peaked logits, many EOS candidates in the Python docs' text)."""
    from transformers import GPT2LMHeadModel

    src = FIXTURES_DIR / "pydocs-gpt2-4l"
    engine = Engine.load(export_folder(src, tmp_path / "m", kv_cache="shared"), provider="cpu", max_batch=8)
    model = GPT2LMHeadModel.from_pretrained(src).eval()
    text = (Path(src) / "heldout.txt").read_text(encoding="utf-8")
    for start, k, es in ((0, 4, False), (3000, 6, True), (9000, 8, "never")):
        prompt = engine.to_tokens(text[start : start + 200])[:40]
        got = engine.generate(prompt, max_new_tokens=24, num_beams=k, early_stopping=es,
                              num_return_sequences=k).completions[0]  # fmt: skip
        want = hf_beams(model, prompt, 24, k, 1.0, es, k, engine.manifest.config.eos_token_id)
        assert_same_beams(ours_of(got), want)


@pytest.mark.parametrize(
    "src, dst",
    [([0, 0, 1, 2], [0, 1, 2, 3]), ([1, 0], [0, 1]), ([1, 2, 0, 3], [0, 1, 2, 3]), ([0, 0, 0], [1, 2, 3]),
     ([2, 0, 1, 1, 4], [0, 1, 2, 3, 4]), ([3, 3, 0, 1], [0, 1, 2, 3])],
)  # fmt: skip
def test_row_copies_read_every_row_before_writing_it(src, dst):
    """copy_order's plan, run on a list, gives rows[dst[i]] = old rows[src[i]] for every i."""
    from gpt2onnx.engine.kv_cache import SAVE, SAVED, copy_order

    rows = [f"row{i}" for i in range(6)]
    want = list(rows)
    for s, d in zip(src, dst):
        want[d] = rows[s]
    saved = None
    for s, d in copy_order(src, dst):
        if s == SAVE:
            saved = rows[d]
        else:
            rows[d] = saved if s == SAVED else rows[s]
    assert rows == want


def test_a_cancelled_beam_search_frees_its_rows(engine, vocab):
    import time

    engine.scheduler.on_step = lambda: time.sleep(0.002)
    try:
        handle = engine.submit([5, 6, 7], max_new_tokens=100, num_beams=4, stream=False)
        while not engine.stats()["active_slots"]:
            time.sleep(0.001)
        handle.cancel()
        assert handle.result(30).finish_reason == "cancelled"
    finally:
        engine.scheduler.on_step = None
    while engine.stats()["active_slots"]:
        time.sleep(0.01)
    assert engine.generate([5, 6, 7], max_new_tokens=4, num_beams=4).completions[0].beams  # serves on


def test_a_long_prompt_in_chunks_beside_running_rows_gets_transformers_beams(varied, vocab, varied_shared):
    """Beam 0's prompt goes in by chunks while another request decodes; the beams start after its
    last chunk, and are still transformers'."""
    import time

    engine = Engine.load(varied_shared, provider="cpu", max_batch=8)
    engine.scheduler.chunk = 8
    engine.scheduler.on_step = lambda: time.sleep(0.001)  # the other request still decodes meanwhile
    long_prompt = np.random.default_rng(3).integers(0, vocab[0], 40).tolist()
    running = engine.submit([1, 2, 3], max_new_tokens=60, ignore_eos=True, stream=False)
    got = engine.generate(long_prompt, max_new_tokens=8, num_beams=3, num_return_sequences=3).completions[0]
    assert_same_beams(ours_of(got), hf_beams(varied, long_prompt, 8, 3, 1.0, False, 3, vocab[1]))
    assert len(running.result(30).token_ids) == 60
