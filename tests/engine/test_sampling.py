"""Sampling functions: pure numpy, checked against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.engine import sampling as S
from gpt2onnx.engine.device_sampling import TOP_K_MAX, build_sampling_graph, matches_host, row_params
from gpt2onnx.engine.sampling import SamplingConfig, next_tokens


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32) * 3


def test_top_k_1_and_tiny_top_p_are_greedy(logits):
    greedy = logits.argmax(-1)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert (next_tokens(logits, SamplingConfig(temperature=1.0, top_k=1), rng) == greedy).all()
        assert (
            next_tokens(logits, SamplingConfig(top_k=1), rng) == greedy
        ).all()  # through the sampling path
        assert (next_tokens(logits, SamplingConfig(temperature=0.7, top_k=1, top_p=0.5), rng) == greedy).all()
        assert (next_tokens(logits, SamplingConfig(temperature=1.0, top_p=1e-9), rng) == greedy).all()
        assert (next_tokens(logits, SamplingConfig(temperature=0.0, top_k=50), rng) == greedy).all()
    assert SamplingConfig().greedy and SamplingConfig(top_k=1).greedy and not SamplingConfig(top_k=5).greedy


def test_temperature_scales_the_distribution(logits):
    p = S.softmax(S.apply_temperature(logits, 0.5))
    np.testing.assert_allclose(p, S.softmax(logits * 2), rtol=1e-5)
    hot = S.softmax(S.apply_temperature(logits, 100.0))
    assert hot.max() < 2 / logits.shape[1]  # nearly uniform


def test_top_k_keeps_exactly_k(logits):
    kept = np.isfinite(S.mask_top_k(logits, 7))
    assert (kept.sum(-1) == 7).all()
    assert (np.isfinite(S.mask_top_k(logits, 1)).sum(-1) == 1).all()
    assert (np.sort(logits, -1)[:, -7:] == np.sort(np.where(kept, logits, -np.inf), -1)[:, -7:]).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    assert np.isfinite(S.mask_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert np.isfinite(S.mask_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert np.isfinite(S.mask_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(S.mask_top_p(logits, 1.0)).all()


def test_min_p_masks_relative_to_the_top_token():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    assert np.isfinite(S.mask_min_p(logits, 0.2)).tolist() == [[True, True, True, False]]  # threshold 0.1
    assert np.isfinite(S.mask_min_p(logits, 0.61)).tolist() == [[True, False, False, False]]


def test_repetition_penalty_follows_transformers():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], dtype=np.float32)
    seen = np.array([[True, True, False, False]])
    assert S.apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_presence_and_frequency_penalties():
    logits = np.zeros((1, 4), dtype=np.float32)
    counts = np.array([[0, 1, 3, 0]])
    out = S.apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [[0.0, -0.75, -1.25, 0.0]])


def test_logit_bias_and_penalties_change_the_greedy_choice():
    logits = np.array([[3.0, 2.0, 1.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert next_tokens(logits, SamplingConfig(logit_bias={2: 5.0}), rng)[0] == 2
    seen, counts = np.array([[True, False, False]]), np.array([[2, 0, 0]])
    assert next_tokens(logits, SamplingConfig(frequency_penalty=1.0), rng, seen, counts)[0] == 1
    assert next_tokens(logits, SamplingConfig(repetition_penalty=4.0), rng, seen, counts)[0] == 1


def test_same_seed_same_draws(logits):
    cfg = SamplingConfig(temperature=1.0)
    a = [next_tokens(logits, cfg, np.random.default_rng(42)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    many = {tuple(next_tokens(logits, cfg, np.random.default_rng(s))) for s in range(20)}
    assert len(many) > 1


def test_sampled_frequencies_match_the_softmax():
    """Chi-square goodness of fit over 20000 draws; the 0.999 quantile for 5 dof is 20.5."""
    logits = np.array([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]], dtype=np.float32)
    p = S.softmax(logits)[0]
    rng = np.random.default_rng(7)
    batch = np.repeat(logits, 20000, axis=0)
    draws = next_tokens(batch, SamplingConfig(temperature=1.0), rng)
    observed = np.bincount(draws, minlength=6)
    expected = p * len(draws)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (
        f"chi2 {chi2:.1f}: observed {observed.tolist()} vs expected {expected.round().tolist()}"
    )


def test_top_k_sampling_only_draws_kept_tokens(logits):
    batch = np.repeat(logits[:1], 2000, axis=0)
    draws = next_tokens(batch, SamplingConfig(top_k=3), np.random.default_rng(1))
    assert set(draws.tolist()) <= set(np.argsort(logits[0])[-3:].tolist())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_k=-2),
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
    ],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


DEVICE_CONFIGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.0),
    SamplingConfig(top_k=1, temperature=1.5),
    SamplingConfig(temperature=0.8),
    SamplingConfig(top_k=40),
    SamplingConfig(top_k=TOP_K_MAX, top_p=0.5, temperature=2.0),
    SamplingConfig(top_k=50, top_p=0.9, temperature=0.7),
    SamplingConfig(min_p=0.1),
    SamplingConfig(top_k=7, min_p=0.3, temperature=1.2),
]


@pytest.fixture(scope="module", params=[50257, 100])
def sampling_graph(request):
    """The sampling graph for GPT-2's vocabulary, and for one smaller than TOP_K_MAX."""
    import onnxruntime as ort

    return request.param, ort.InferenceSession(
        build_sampling_graph(request.param).SerializeToString(), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("cfg", DEVICE_CONFIGS, ids=str)
def test_the_sampling_graph_draws_what_next_tokens_draws(sampling_graph, cfg):
    """Same logits, same uniform draws: the ONNX sampling graph and the numpy functions pick the
    same token for every row (peaked and flat logits)."""
    vocab, session = sampling_graph
    gen = np.random.default_rng(7)
    assert matches_host(cfg)
    for trial in range(30):
        logits = (gen.standard_normal((5, vocab)) * (0.3 if trial % 2 else 4.0)).astype(np.float32)
        seed = int(gen.integers(1 << 30))
        host = next_tokens(logits, cfg, np.random.default_rng(seed))
        uniform = np.random.default_rng(seed).random(5)
        (device,) = session.run(None, {"logits": logits, "params": row_params(cfg, 5), "uniform": uniform})
        np.testing.assert_array_equal(device, host, err_msg=f"trial {trial}")


def test_settings_outside_the_sampling_graph_stay_on_the_host():
    assert not matches_host(SamplingConfig(top_p=0.9))  # its cut-off may lie past TOP_K_MAX
    assert not matches_host(SamplingConfig(top_k=TOP_K_MAX + 1))
    assert not matches_host(SamplingConfig(repetition_penalty=1.2))
    assert not matches_host(SamplingConfig(logit_bias={1: 1.0}))
    assert matches_host(SamplingConfig(top_k=10, top_p=0.9)) and matches_host(SamplingConfig(temperature=0.5))


ROW_SETTINGS = [
    S.SamplingConfig(),
    S.SamplingConfig(temperature=0.7, seed=1),
    S.SamplingConfig(top_k=5, seed=2),
    S.SamplingConfig(top_p=0.8, temperature=1.3, seed=3),
    S.SamplingConfig(min_p=0.3, seed=4),
    S.SamplingConfig(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, top_k=40, seed=5),
    S.SamplingConfig(logit_bias={3: 5.0, 7: -100.0}, seed=6),
    S.SamplingConfig(top_k=1),
]


def test_rows_with_their_own_settings_pick_what_each_picks_alone():
    """One vectorized call over rows of mixed settings, each with its own generator, gives every
    row the tokens it gets alone (what continuous batching needs)."""
    gen = np.random.default_rng(0)
    B, V = len(ROW_SETTINGS), 300
    seen, counts = gen.random((B, V)) < 0.1, gen.integers(0, 3, (B, V)).astype(np.int32)
    rngs = [np.random.default_rng(c.seed) for c in ROW_SETTINGS]
    alone_rngs = [np.random.default_rng(c.seed) for c in ROW_SETTINGS]
    for step in range(20):
        logits = (3 * gen.standard_normal((B, V))).astype(np.float32)
        together = S.sample_rows(logits, ROW_SETTINGS, rngs, seen, counts)
        alone = [S.next_tokens(logits[r : r + 1], c, alone_rngs[r], seen[r : r + 1], counts[r : r + 1])[0]
                 for r, c in enumerate(ROW_SETTINGS)]  # fmt: skip
        assert together.tolist() == alone, f"step {step}"
    assert len({int(t) for t in together}) > 1
