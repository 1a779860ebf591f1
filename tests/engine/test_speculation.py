"""Speculative decoding by prompt lookup: greedy output identical to plain decoding (alone, beside
other requests, at EOS, stop strings and max_new_tokens), the sampling rule's distribution (a
chi-square test that an off-by-one fails), the lookup itself, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import export_folder, make_varied_model, save_hf_folder
from gpt2onnx.engine.contract import InputError, ModelFolderError
from gpt2onnx.engine.draft import DRAFT_PAYS, Draft
from gpt2onnx.engine.engine import DRAFT_TOKENS, Engine
from gpt2onnx.engine.speculation import Lookup, accept_greedy, accept_sampled, lookup

CHI2_999 = {4: 18.47, 5: 20.52, 9: 27.88}  # chi-square's 0.999 quantile by degrees of freedom


@pytest.fixture(scope="module")
def engine(varied_shared) -> Engine:
    return Engine.load(varied_shared, provider="cpu", max_batch=8)


def looping_prompts(engine, n: int, seed: int) -> list[list[int]]:
    """Prompts whose greedy continuation repeats itself (random weights fall into loops), with
    some of the prompt said twice: prompt lookup has much to propose and much is kept."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, engine.vocab_size, int(rng.integers(3, 8))).tolist()
        out.append(
            base + rng.integers(0, engine.vocab_size, 2).tolist() + base[: int(rng.integers(1, len(base)))]
        )
    return out


@pytest.mark.parametrize("n", [1, 3, 8])
def test_greedy_tokens_are_plain_decodings(engine, n):
    """The varied model (weights x20): its drafts are sometimes kept, often not."""
    before = engine.stats()
    for prompt in looping_prompts(engine, 12, n):
        plain = engine.generate(prompt, max_new_tokens=40).completions[0]
        fast = engine.generate(prompt, max_new_tokens=40, prompt_lookup=n).completions[0]
        assert (
            fast.token_ids == plain.token_ids
            and fast.text == plain.text
            and fast.finish_reason == plain.finish_reason
        )
    after = engine.stats()
    assert after["draft_tokens_proposed"] > before["draft_tokens_proposed"]


def test_long_runs_of_kept_drafts_are_plain_decodings(tiny_shared):
    """The tiny model says one token whatever the prompt: every draft of its loop is kept, so
    each verification hands out up to N + 1 tokens."""
    engine = Engine.load(tiny_shared, provider="cpu")
    before = engine.stats()
    for prompt, n in (([5, 6, 7], 4), ([9, 9, 9, 9], 8), ([1, 2, 3, 4, 5, 6], 16)):
        plain = engine.generate(prompt, max_new_tokens=50, ignore_eos=True).completions[0]
        fast = engine.generate(prompt, max_new_tokens=50, ignore_eos=True, prompt_lookup=n).completions[0]
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) == 50
    after = engine.stats()
    assert after["draft_tokens_accepted"] - before["draft_tokens_accepted"] > 100


def test_beside_other_requests_every_one_gets_its_own_tokens(engine, vocab):
    prompts = looping_prompts(engine, 6, 42)
    alone = [engine.generate(p, max_new_tokens=30).completions[0].token_ids for p in prompts]
    handles = [engine.submit(p, max_new_tokens=30, stream=False, prompt_lookup=5 if i % 2 else 0)
               for i, p in enumerate(prompts)]  # fmt: skip
    assert [h.result().token_ids for h in handles] == alone
    sampled = engine.submit(
        prompts[0], max_new_tokens=30, temperature=0.8, seed=3
    )  # a sampled row beside them
    together = engine.generate(prompts[1:], max_new_tokens=30, prompt_lookup=4).completions
    assert [c.token_ids for c in together] == alone[1:] and len(sampled.result().token_ids) == 30


@pytest.mark.parametrize("max_new", [1, 2, 7, 33])
def test_max_new_tokens_and_stop_strings_end_where_plain_decoding_ends(engine, max_new):
    for prompt in looping_prompts(engine, 5, max_new):
        plain = engine.generate(prompt, max_new_tokens=max_new).completions[0]
        fast = engine.generate(prompt, max_new_tokens=max_new, prompt_lookup=6).completions[0]
        assert fast.token_ids == plain.token_ids and len(fast.token_ids) <= max_new
        if len(plain.text) > 6:  # a stop string from inside the text
            stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
            a = engine.generate(prompt, max_new_tokens=max_new, stop=stop).completions[0]
            b = engine.generate(prompt, max_new_tokens=max_new, stop=stop, prompt_lookup=6).completions[0]
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


def test_an_eos_among_the_kept_drafts_ends_the_request(vocab, tokenizer_dir, tmp_path):
    """EOS set to a token the model says in its loops, so kept drafts and the target's own next
    token hit it: the request ends there, as plain decoding does."""
    model = make_varied_model(vocab)
    hf = save_hf_folder(model, tmp_path / "hf", tokenizer_dir)
    plain_engine = Engine.load(export_folder(hf, tmp_path / "a", kv_cache="shared"), provider="cpu")
    prompt = looping_prompts(plain_engine, 1, 5)[0]
    loop = plain_engine.generate(prompt, max_new_tokens=30).completions[0].token_ids
    eos = loop[12]
    model.config.eos_token_id = eos
    hf = save_hf_folder(model, tmp_path / "hf-eos", tokenizer_dir)
    engine = Engine.load(export_folder(hf, tmp_path / "b", kv_cache="shared"), provider="cpu")
    plain = engine.generate(prompt, max_new_tokens=30).completions[0]
    fast = engine.generate(prompt, max_new_tokens=30, prompt_lookup=8).completions[0]
    assert plain.finish_reason == "eos" and (fast.token_ids, fast.finish_reason) == (plain.token_ids, "eos")


def test_sampled_requests_run_and_repeat_with_a_seed(engine):
    prompt = looping_prompts(engine, 1, 9)[0]
    runs = [engine.generate(prompt, max_new_tokens=25, temperature=0.7, top_k=20, seed=11, prompt_lookup=4)
            .completions[0].token_ids for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1] and len(runs[0]) == 25


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("drafts", [[2, 0, 3], [4, 4], [1]])
def test_the_sampling_rule_gives_the_targets_distribution(drafts):
    """accept_sampled over 20,000 seeded draws: its first token has the target's distribution
    p0, and after the first draft is kept, its second token has p1 (the rule's bonus or residual
    draw); a version that tests draft i against probs[i + 1] fails this."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=len(drafts) + 1)
    firsts, seconds = np.zeros(5), np.zeros(5)
    for _ in range(20000):
        out = accept_sampled(drafts, probs, rng)
        firsts[out[0]] += 1
        if out[0] == drafts[0]:
            seconds[out[1]] += 1
    assert chi2(firsts, probs[0]) < CHI2_999[4]
    assert chi2(seconds, probs[1]) < CHI2_999[4]


def test_an_off_by_one_rule_fails_the_test():
    """The test above has power: a rule that checks draft i against the next position's
    distribution gives the first token the wrong law."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(5), size=4)
    drafts = [2, 0]
    counts = np.zeros(5)
    for _ in range(20000):
        counts[accept_sampled(drafts, probs[1:], rng)[0]] += 1  # shifted by one position
    assert chi2(counts, probs[0]) > CHI2_999[4]


def test_accept_greedy_keeps_the_agreeing_prefix_and_the_targets_token():
    assert accept_greedy([5, 6, 7], np.array([5, 6, 7, 8])) == [5, 6, 7, 8]  # all kept, and the bonus
    assert accept_greedy([5, 6, 7], np.array([5, 9, 7, 8])) == [5, 9]
    assert accept_greedy([5], np.array([4, 1])) == [4]


def test_lookup_takes_the_longest_n_gram_and_its_most_recent_match_with_room():
    h = np.array([1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3])
    assert lookup(h, 3) == [8, 7, 1]  # the 3-gram (1, 2, 3) last seen before 8
    assert lookup(np.array([4, 5, 6, 7, 5, 6]), 5) == [7, 5, 6]  # the 2-gram (5, 6)
    assert lookup(np.array([1, 2, 3, 4]), 5) == []  # nothing repeats
    assert lookup(np.array([7, 7, 7, 7, 7]), 2) == [
        7,
        7,
    ]  # in a loop: an earlier occurrence with room after it
    assert lookup(np.array([1, 2, 5, 1, 2, 6, 6, 1, 2]), 1) == [6]  # the most recent, with enough after it


def test_a_slot_backs_off_after_rejections_and_adapts_its_drafts():
    slot = Lookup(4)
    history = np.array([1, 2, 3, 4, 5, 6, 1, 2])
    assert slot.propose(history, 10) == [3, 4, 5, 6]
    slot.kept(4, 0)
    assert slot.propose(history, 10) == [] and slot.propose(history, 10) == [
        3
    ]  # skipped one step; 0 + 1 drafts
    slot.kept(1, 0)
    assert [slot.propose(history, 10) for _ in range(3)] == [[], [], [3]]  # then two
    slot.kept(1, 1)  # all kept: twice as many next time
    assert slot.propose(history, 10) == [3, 4] and (slot.proposed, slot.accepted) == (6, 1)
    slot.kept(2, 2)
    assert slot.propose(history, 10) == [3, 4, 5, 6]  # up to the 4 asked for
    assert slot.propose(history, 2) == [3, 4]  # and no more than the room


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_lookup": -1}, "prompt_lookup must be an integer from 0"),
        ({"prompt_lookup": 65}, "prompt_lookup must be an integer from 0"),
        ({"prompt_lookup": 4, "num_beams": 2}, "does not work with beam search"),
        ({"prompt_lookup": 2.5}, "prompt_lookup must be an integer from 0"),
    ],
)
def test_bad_prompt_lookup_arguments_are_named(engine, kwargs, message):
    with pytest.raises(InputError, match=message):
        engine.generate([1, 2, 3], max_new_tokens=4, **kwargs)


@pytest.mark.parametrize(
    "settings",
    [
        {"frequency_penalty": 0.02},
        {"frequency_penalty": 0.005},
        {"repetition_penalty": 1.05},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.01},
        {"logit_bias": {7: 2.5, 11: -3.0}},
    ],
)
def test_penalties_and_logit_bias_speculate_to_plain_decodings_tokens(tiny_shared, settings):
    """A verification's argmax is taken after the logit bias and the penalties, with each
    position's history holding the drafts before it (the graph's own argmax knows neither). The
    tiny model repeats a token until its frequency penalty outweighs it, so where a run ends
    depends on the kept drafts being counted."""
    engine = Engine.load(tiny_shared, provider="cpu")
    for prompt in looping_prompts(engine, 6, 21):
        plain = engine.generate(prompt, max_new_tokens=30, **settings).completions[0]
        fast = engine.generate(prompt, max_new_tokens=30, prompt_lookup=6, **settings).completions[0]
        assert fast.token_ids == plain.token_ids, settings
    assert engine.stats()["draft_tokens_accepted"] > 0


def streamed_logprobs(engine, prompt, **kw) -> tuple[list[int], list[float], list[dict]]:
    """A streamed request's token ids, their log-probabilities and the top ones, piece by piece."""
    ids, logprobs, tops = [], [], []
    for piece in engine.submit(prompt, max_new_tokens=24, logprobs=3, **kw):
        ids += piece.token_ids
        logprobs += piece.token_logprobs
        tops += piece.top_logprobs
    return ids, logprobs, tops


@pytest.mark.parametrize("model", ["tiny_shared", "varied_shared"])  # every draft kept; few
def test_logprobs_with_prompt_lookup_are_plain_decodings(model, request):
    """Each token's log-probability and top ones come from the verification's logits at its
    position: the same tokens, values within float32's rounding of plain decoding's."""
    engine = Engine.load(request.getfixturevalue(model), provider="cpu")
    for prompt in looping_prompts(engine, 6, 31):
        ids, logprobs, tops = streamed_logprobs(engine, prompt)
        fast_ids, fast_logprobs, fast_tops = streamed_logprobs(engine, prompt, prompt_lookup=5)
        assert fast_ids == ids and len(fast_logprobs) == len(ids)
        np.testing.assert_allclose(fast_logprobs, logprobs, atol=1e-4)
        for got, want in zip(fast_tops, tops):
            assert list(got) == list(want)
            np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-4)
    assert engine.stats()["draft_tokens_proposed"] > 0


def test_a_seeded_sampled_speculative_request_draws_as_it_does_alone(tiny_shared):
    """Between rows that decode plainly, a speculative row sits their steps out: the step's
    picker neither draws from its generator nor records in its history. (The tiny model at top_k
    2 and a high temperature draws among few tokens: its text repeats, so the lookup proposes
    at most steps and some of it is kept.)"""
    engine = Engine.load(tiny_shared, provider="cpu")
    prompts = looping_prompts(engine, 4, 41)
    settings = dict(max_new_tokens=40, temperature=3.0, top_k=2, seed=5, prompt_lookup=4)
    alone = engine.generate(prompts[0], **settings).completions[0].token_ids
    assert engine.stats()["draft_tokens_accepted"] > 0
    for first in (True, False):  # its row below theirs (in their steps), then above
        mine = engine.submit(prompts[0], stream=False, **settings) if first else None
        others = [engine.submit(p, max_new_tokens=40, stream=False) for p in prompts[1:]]
        mine = mine or engine.submit(prompts[0], stream=False, **settings)
        assert mine.result().token_ids == alone
        [h.result() for h in others]


def test_picker_logits_are_what_the_picker_sees_after_each_draft():
    """Row i: sample_rows' logit bias and penalties, with the history after the pending token and
    drafts[:i]; checked against sampling's own functions one position at a time."""
    from gpt2onnx.engine.sampling import (
        SamplingConfig,
        apply_logit_bias,
        apply_presence_frequency,
        apply_repetition_penalty,
    )
    from gpt2onnx.engine.speculation import picker_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 12)).astype(np.float32)
    cfg = SamplingConfig(
        repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2, logit_bias={2: 1.0}
    )
    seen, counts = np.zeros(12, bool), np.zeros(12, np.int32)
    seen[[1, 5]], counts[5] = True, 2
    drafts = [5, 7, 5]
    got = picker_logits(logits, drafts, cfg, seen, counts)
    for i in range(4):
        s, c = seen.copy(), counts.copy()
        for d in drafts[:i]:
            s[d], c[d] = True, c[d] + 1
        z = apply_logit_bias(logits[i : i + 1], [cfg.logit_bias])
        z = apply_presence_frequency(apply_repetition_penalty(z, s[None], 1.4), c[None], 0.3, 0.2)
        np.testing.assert_array_equal(got[i], z[0])
    assert seen.sum() == 2 and counts.sum() == 2  # the row's own history is left as it was


def test_prompt_lookup_needs_the_shared_cache(varied_fp32):
    with pytest.raises(InputError, match="prompt_lookup needs the shared cache"):
        Engine.load(varied_fp32, provider="cpu").generate([1, 2], max_new_tokens=3, prompt_lookup=2)


# -- a draft model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tiny(vocab, tokenizer_dir, tmp_path_factory):
    """Another tiny model (seed 1, weights x20) with the same tokenizer: a draft that is often wrong."""
    folder = save_hf_folder(
        make_varied_model(vocab, seed=1), tmp_path_factory.mktemp("draft") / "hf", tokenizer_dir
    )
    return export_folder(folder, tmp_path_factory.mktemp("draft") / "shared", kv_cache="shared")


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_a_draft_model_is_plain_decoding(engine, varied_shared, other_tiny, k):
    for draft in (other_tiny, varied_shared):  # often wrong; always right (the target itself)
        fast = Engine.load(varied_shared, provider="cpu", max_batch=8, draft=draft)
        prompts = looping_prompts(engine, 6, k)
        plain = engine.generate(prompts, max_new_tokens=24).completions
        got = fast.generate(prompts, max_new_tokens=24, draft_tokens=k).completions
        assert [c.token_ids for c in got] == [c.token_ids for c in plain]
        stats = fast.stats()
        if draft == varied_shared:  # the target as its own draft: every proposal is kept
            assert stats["draft_tokens_accepted"] == stats["draft_tokens_proposed"] > 0


def test_a_draft_models_requests_beside_plain_ones(varied_shared, other_tiny, engine):
    fast = Engine.load(varied_shared, provider="cpu", max_batch=8, draft=other_tiny)
    prompts = looping_prompts(engine, 4, 77)
    alone = [engine.generate(p, max_new_tokens=20).completions[0].token_ids for p in prompts]
    handles = [
        fast.submit(p, max_new_tokens=20, stream=False, draft_tokens=3 * (i % 2))
        for i, p in enumerate(prompts)
    ]
    assert [h.result().token_ids for h in handles] == alone
    before = fast.stats()["draft_tokens_proposed"]
    sampled = fast.generate(prompts[0], max_new_tokens=20, temperature=0.9, seed=4, draft_tokens=2)
    assert len(sampled.completions[0].token_ids) == 20 and fast.stats()["draft_tokens_proposed"] > before


def test_the_draft_is_the_default_only_where_it_pays(varied_shared, other_tiny, engine, monkeypatch):
    """A draft the target's size costs what the target costs: calls use it only when they ask.
    One measured at most DRAFT_PAYS of the target is every greedy call's default."""
    prompt = looping_prompts(engine, 1, 9)[0]
    same_size = Engine.load(varied_shared, provider="cpu", draft=other_tiny)
    assert same_size.draft_tokens == 0
    same_size.generate(prompt, max_new_tokens=12)
    assert same_size.stats()["draft_tokens_proposed"] == 0
    same_size.generate(prompt, max_new_tokens=12, draft_tokens=3)
    assert same_size.stats()["draft_tokens_proposed"] > 0
    monkeypatch.setattr(Draft, "step_cost", lambda self, target: DRAFT_PAYS)
    cheap = Engine.load(varied_shared, provider="cpu", draft=other_tiny)
    assert cheap.draft_tokens == DRAFT_TOKENS
    plain = engine.generate(prompt, max_new_tokens=12).completions[0].token_ids
    assert cheap.generate(prompt, max_new_tokens=12).completions[0].token_ids == plain
    assert cheap.stats()["draft_tokens_proposed"] > 0
    before = cheap.stats()[
        "draft_tokens_proposed"
    ]  # sampled calls: only when asked (the same draws on every load)
    cheap.generate(prompt, max_new_tokens=12, temperature=0.8, seed=1)
    assert cheap.stats()["draft_tokens_proposed"] == before


@pytest.mark.parametrize("drafts", [[None] * 3, [None] * 2])
def test_the_draft_models_rule_gives_the_targets_distribution(drafts):
    """accept_sampled with the draft's distributions q (each draft drawn from its q, as a draft
    model draws them): the first token has the target's p0, and after the first draft is kept,
    the second has p1."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(5), size=len(drafts) + 1)
    q = rng.dirichlet(np.ones(5), size=len(drafts))
    firsts, seconds = np.zeros(5), np.zeros(5)
    for _ in range(20000):
        proposal = [int(rng.choice(5, p=q[i])) for i in range(len(drafts))]
        out = accept_sampled(proposal, probs, rng, q)
        firsts[out[0]] += 1
        if out[0] == proposal[0] and len(out) > 1:
            seconds[out[1]] += 1
    assert chi2(firsts, probs[0]) < CHI2_999[4]
    assert chi2(seconds, probs[1]) < CHI2_999[4]


def test_draft_model_refusals(varied_shared, varied_fp32, engine, tmp_path):
    import json
    import shutil

    with pytest.raises(InputError, match="draft_tokens needs a draft model"):
        engine.generate([1, 2], max_new_tokens=3, draft_tokens=2)
    fast = Engine.load(varied_shared, provider="cpu", draft=varied_shared)
    with pytest.raises(InputError, match="pass prompt_lookup or draft_tokens, not both"):
        fast.generate([1, 2], max_new_tokens=3, draft_tokens=2, prompt_lookup=2)
    with pytest.raises(ModelFolderError, match="export it with --kv-cache shared"):
        Engine.load(varied_shared, provider="cpu", draft=varied_fp32)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(varied_shared, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: the same size, another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFolderError, match="has another tokenizer"):
        Engine.load(varied_shared, provider="cpu", draft=other)


def test_a_draft_engine_speculates_what_it_can(varied_shared, other_tiny, engine, monkeypatch):
    """The draft is the default wherever a greedy call allows it: with penalties, logit_bias and
    logprobs too (plain decoding's tokens); beams run plainly, and asking for draft_tokens with
    them is refused."""
    monkeypatch.setattr(Draft, "step_cost", lambda self, target: 0.1)  # a draft that pays: the default
    fast = Engine.load(varied_shared, provider="cpu", max_batch=8, draft=other_tiny)
    assert fast.draft_tokens > 0
    prompt = looping_prompts(engine, 1, 5)[0]
    for kwargs in ({"repetition_penalty": 1.3}, {"logit_bias": {5: 3.0}}, {"num_beams": 2}):
        before = fast.stats()["draft_tokens_proposed"]
        want = engine.generate(prompt, max_new_tokens=10, **kwargs).completions[0].token_ids
        assert fast.generate(prompt, max_new_tokens=10, **kwargs).completions[0].token_ids == want
        assert (fast.stats()["draft_tokens_proposed"] > before) == ("num_beams" not in kwargs)
    ids, logprobs, _ = streamed_logprobs(engine, prompt)
    fast_ids, fast_logprobs, _ = streamed_logprobs(fast, prompt)
    assert fast_ids == ids
    np.testing.assert_allclose(fast_logprobs, logprobs, atol=1e-4)
    with pytest.raises(InputError, match="draft_tokens does not work with beam search"):
        fast.generate(prompt, max_new_tokens=4, draft_tokens=3, num_beams=2)


def test_generate_cli_with_a_draft_model_is_plain_decoding(varied_shared, other_tiny, capsys):
    import json

    from gpt2onnx.cli import main

    argv = ["generate", "--model", str(varied_shared), "--prompt", "one two three one two", "--max-new-tokens",
            "16", "--json"]  # fmt: skip
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)["completions"]
    assert main([*argv, "--draft-model", str(other_tiny), "--num-speculative-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["completions"] == plain
    assert main([*argv, "--num-speculative-tokens", "3"]) == 2
    assert "--num-speculative-tokens needs --draft-model" in capsys.readouterr().err


def test_sampled_speculation_end_to_end_has_the_models_joint_distribution(varied_shared, other_tiny):
    """3,000 seeded runs of 3 tokens with a draft model proposing 2 (so the 2nd and 3rd tokens
    come out of a verification): the joint law of the 3 tokens equals the model's own, computed
    exactly from its logits (top_k 3, temperature 3: 27 outcomes), by a chi-square test."""
    from gpt2onnx.engine.sampling import SamplingConfig
    from gpt2onnx.engine.speculation import target_probs

    fast = Engine.load(varied_shared, provider="cpu", max_batch=1, draft=other_tiny)
    prompt, cfg = [50256, 464, 3139], SamplingConfig(temperature=3.0, top_k=3)
    counts: dict[tuple, int] = {}
    for seed in range(3000):
        c = fast.generate(prompt, max_new_tokens=3, ignore_eos=True, temperature=3.0, top_k=3, seed=seed,
                          draft_tokens=2).completions[0]  # fmt: skip
        counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    assert fast.stats()["draft_tokens_proposed"] >= 3000  # every run verified drafts

    def law(prefix):
        return target_probs(fast.logits([prompt + prefix])[0, -1:], cfg)[0]

    expected = {}
    p1 = law([])
    for a in np.flatnonzero(p1):
        p2 = law([int(a)])
        for b in np.flatnonzero(p2):
            p3 = law([int(a), int(b)])
            for c in np.flatnonzero(p3):
                expected[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    assert set(counts) <= set(expected) and len(expected) == 27
    keys = sorted(expected)
    stat = chi2(np.array([counts.get(k, 0) for k in keys], float), np.array([expected[k] for k in keys]))
    assert stat < 54.05  # chi-square's 0.999 quantile at 26 degrees of freedom


def test_an_engine_default_prompt_lookup_applies_where_calls_allow_it(tiny_shared, varied_shared):
    """Engine.load(prompt_lookup=N) (serve --prompt-lookup): calls that say nothing speculate,
    calls that cannot (penalties) run plainly, and a call may turn it off. The tiny model loops,
    so there is always something to propose."""
    engine = Engine.load(tiny_shared, provider="cpu", max_batch=8)
    fast = Engine.load(tiny_shared, provider="cpu", max_batch=8, prompt_lookup=4)
    prompts = [[5, 6, 7], [9, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
    want = [c.token_ids for c in engine.generate(prompts, max_new_tokens=20).completions]
    assert [c.token_ids for c in fast.generate(prompts, max_new_tokens=20).completions] == want
    assert fast.stats()["draft_tokens_proposed"] > 0
    before = fast.stats()["draft_tokens_proposed"]
    plain = engine.generate(prompts[0], max_new_tokens=10, repetition_penalty=1.3).completions[0].token_ids
    assert (
        fast.generate(prompts[0], max_new_tokens=10, repetition_penalty=1.3).completions[0].token_ids == plain
    )
    fast.generate(prompts[0], max_new_tokens=10, prompt_lookup=0)
    assert fast.stats()["draft_tokens_proposed"] == before
    with pytest.raises(InputError, match="prompt_lookup must be"):
        Engine.load(varied_shared, provider="cpu", prompt_lookup=-2)


NEAR_TIE = 0.1  # logits this close are within an 8-bit step's arithmetic noise (see the test below)


def test_int8_greedy_is_plain_decoding_except_at_near_ties(varied_int8_shared, engine):
    """A verification runs attention over several positions, a plain step over one, and onnxruntime
    multiplies one query row by another kernel (MLAS's single-row path) whose results differ in the
    last bits; 8-bit activations (rounded per row) can turn those bits into logits that differ by
    up to a few hundredths. So on an int8 model the tokens are plain decoding's except where its
    top two logits are that close, and there the output may take the other one. Nothing else may
    differ: at each prompt's first difference, plain decoding's own choice must be a near-tie."""
    int8 = Engine.load(varied_int8_shared, provider="cpu", max_batch=8)
    prompts, same = looping_prompts(engine, 24, 11), 0
    for prompt in prompts:
        ids, _, tops = streamed_logprobs(int8, prompt)
        fast = int8.generate(prompt, max_new_tokens=24, prompt_lookup=6).completions[0]
        if fast.token_ids == ids:
            same += 1
            continue
        i = next(i for i, (a, b) in enumerate(zip(fast.token_ids, ids)) if a != b)
        first, second = sorted(tops[i].values(), reverse=True)[:2]
        assert first - second < NEAR_TIE, (prompt, i, first - second)
    assert same >= len(prompts) * 3 // 4 and int8.stats()["draft_tokens_accepted"] > 0
