"""Tests for longtake.core.windows: planning, weights, fusion, noise, prompt timelines."""

import random

import pytest
import torch

from longtake.core.windows import (
    NOISE_CORRELATION,
    NOISE_HORIZON,
    NOISE_MODES,
    WEIGHTINGS,
    PromptKey,
    correlate_frames,
    frame_seed,
    frames_noise,
    fuse,
    initial_noise,
    interpolate_embeddings,
    plan_loop,
    plan_windows,
    prompt_schedule,
    take_window,
    window_weights,
)

FLO_CASES = [(f, l, o) for f in (1, 2, 5, 16, 17, 23, 40, 64, 65, 70) for l in (1, 4, 7, 16) for o in
             sorted({0, 1, l // 2, l - 1}) if o < l]
FLO_CASES += [(17, 16, 4), (16, 16, 4), (33, 16, 4), (29, 8, 3), (50, 12, 0), (9, 3, 2)]


# ---------------------------------------------------------------- plan_windows

def test_plan_windows_contract_exhaustive():
    for f in range(1, 71):
        for l in range(1, 18):
            for o in range(l):
                plan = plan_windows(f, l, o)
                s = l - o
                assert plan[0][0] == 0 and plan[-1][1] == f
                assert all(e - b == min(l, f) for b, e in plan)
                assert len(set(plan)) == len(plan)
                starts = [b for b, _ in plan]
                assert all(y > x for x, y in zip(starts, starts[1:]))
                assert all(y - x == s for x, y in zip(starts[:-2], starts[1:-1]))
                if len(plan) > 1:
                    assert plan[-1][0] == f - l
                    assert 0 < starts[-1] - starts[-2] <= s
                    assert plan[-2][1] < f  # no window after one that already ends at F
                covered = set()
                for b, e in plan:
                    covered.update(range(b, e))
                assert covered == set(range(f))


def test_plan_windows_examples():
    assert plan_windows(5, 16, 4) == [(0, 5)]
    assert plan_windows(16, 16, 4) == [(0, 16)]
    assert plan_windows(17, 16, 4) == [(0, 16), (1, 17)]
    assert plan_windows(28, 16, 4) == [(0, 16), (12, 28)]
    assert plan_windows(30, 16, 4) == [(0, 16), (12, 28), (14, 30)]
    assert plan_windows(8, 4, 0) == [(0, 4), (4, 8)]


@pytest.mark.parametrize("args, field, value", [
    ((20, 16, 16), "overlap", "16"),
    ((20, 16, 20), "overlap", "20"),
    ((20, 16, -1), "overlap", "-1"),
    ((20, 0, 0), "window", "0"),
    ((20, -3, 0), "window", "-3"),
    ((0, 16, 4), "num_frames", "0"),
    ((-5, 16, 4), "num_frames", "-5"),
])
def test_plan_windows_errors(args, field, value):
    with pytest.raises(ValueError) as err:
        plan_windows(*args)
    msg = str(err.value)
    assert msg.startswith(f"{field}: got {value},") and "expected" in msg


def test_overlap_error_message_exact():
    with pytest.raises(ValueError, match=r"^overlap: got 16, expected 0 <= overlap < window \(16\)$"):
        plan_windows(40, 16, 16)


# ---------------------------------------------------------------- window_weights

@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weights_positive_and_shaped(weighting):
    for f, l, o in FLO_CASES:
        plan = plan_windows(f, l, o)
        weights = window_weights(plan, weighting)
        assert len(weights) == len(plan)
        for (b, e), w in zip(plan, weights):
            assert w.dtype == torch.float64 and w.shape == (e - b,)
            assert bool((w > 0).all())


def test_weights_values():
    plan = [(0, 5)]
    assert window_weights(plan, "flat")[0].tolist() == [1.0] * 5
    assert window_weights(plan, "pyramid")[0].tolist() == [1, 2, 3, 2, 1]
    assert window_weights([(0, 4)], "pyramid")[0].tolist() == [1, 2, 2, 1]
    assert window_weights(plan, "overlap-linear")[0].tolist() == [1.0] * 5


def test_overlap_linear_ramps():
    plan = plan_windows(30, 16, 4)  # [(0, 16), (12, 28), (14, 30)]
    w0, w1, w2 = window_weights(plan, "overlap-linear")
    ramp4 = [k / 5 for k in range(1, 5)]
    assert torch.allclose(w0, torch.tensor([1.0] * 12 + ramp4[::-1], dtype=torch.float64))
    # middle: ramp-in over 4 shared with previous, ramp-out over the 14 shared with the tail
    ramp_in = torch.tensor(ramp4 + [1.0] * 12, dtype=torch.float64)
    ramp_out = torch.tensor([1.0] * 2 + [k / 15 for k in range(14, 0, -1)], dtype=torch.float64)
    assert torch.allclose(w1, torch.minimum(ramp_in, ramp_out))
    # tail: 14 frames shared with previous (more than the nominal 4), no ramp-out
    assert torch.allclose(w2, torch.tensor([k / 15 for k in range(1, 15)] + [1.0] * 2, dtype=torch.float64))
    assert w0[0] == 1.0 and w2[-1] == 1.0


def test_overlap_linear_no_overlap_is_flat():
    for w in window_weights(plan_windows(12, 4, 0), "overlap-linear"):
        assert w.tolist() == [1.0] * 4


def test_unknown_weighting():
    with pytest.raises(ValueError, match=r"^weighting: got 'x', expected one of flat, pyramid, overlap-linear$"):
        window_weights([(0, 4)], "x")


# ---------------------------------------------------------------- fuse

@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fuse_identical_preds_exact(weighting):
    gen = torch.Generator().manual_seed(0)
    for f, l, o in FLO_CASES:
        full = torch.randn(1, 3, f, 2, 2, generator=gen)  # (1, C, F, H, W)
        plan = plan_windows(f, l, o)
        preds = [full[:, :, b:e].clone() for b, e in plan]
        out = fuse(preds, plan, window_weights(plan, weighting), f)
        assert out.dtype == torch.float32 and out.shape == full.shape
        assert torch.equal(out, full), (weighting, f, l, o)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fuse_other_frame_dim_and_dtype(weighting):
    f, plan = 23, plan_windows(23, 8, 3)
    full = torch.randn(f, 4, dtype=torch.float64)  # (F, D)
    preds = [full[b:e] for b, e in plan]
    out = fuse(preds, plan, window_weights(plan, weighting), f, frame_dim=0)
    assert out.dtype == torch.float64 and (out - full).abs().max() < 1e-12
    half = full.to(torch.bfloat16)
    out = fuse([half[b:e] for b, e in plan], plan, window_weights(plan, weighting), f, frame_dim=-2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, half)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_fuse_convex(weighting):
    for f, l, o in FLO_CASES:
        plan = plan_windows(f, l, o)
        values = [float(v) for v in torch.linspace(-3, 5, len(plan))]
        preds = [torch.full((1, 2, e - b, 1, 1), v) for (b, e), v in zip(plan, values)]
        out = fuse(preds, plan, window_weights(plan, weighting), f)
        for frame in range(f):
            covering = [v for (b, e), v in zip(plan, values) if b <= frame < e]
            lo, hi = min(covering), max(covering)
            x = out[0, :, frame]
            assert bool((x >= lo - 1e-6).all() and (x <= hi + 1e-6).all())


def test_fuse_two_window_hand_example():
    plan = plan_windows(6, 4, 2)  # [(0, 4), (2, 6)]
    assert plan == [(0, 4), (2, 6)]
    preds = [torch.zeros(1, 1, 4, 1, 1), torch.full((1, 1, 4, 1, 1), 2.0)]
    out = fuse(preds, plan, window_weights(plan, "flat"), 6)
    assert out.flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    out = fuse(preds, plan, window_weights(plan, "pyramid"), 6)  # weights [1,2,2,1] / [1,2,2,1]
    assert out.flatten().tolist() == pytest.approx([0.0, 0.0, 2 * 1 / 3, 2 * 2 / 3, 2.0, 2.0])


def test_fuse_errors():
    plan = [(0, 4), (2, 6)]
    weights = window_weights(plan, "flat")
    good = [torch.zeros(1, 1, 4, 1, 1)] * 2
    with pytest.raises(ValueError, match="preds"):
        fuse(good[:1], plan, weights, 6)
    with pytest.raises(ValueError, match="preds\\[1\\]"):
        fuse([good[0], torch.zeros(1, 1, 3, 1, 1)], plan, weights, 6)
    with pytest.raises(ValueError, match="preds\\[1\\]"):
        fuse([good[0], torch.zeros(1, 2, 4, 1, 1)], plan, weights, 6)
    with pytest.raises(ValueError, match="plan\\[1\\]"):
        fuse(good, plan, weights, 5)
    with pytest.raises(ValueError, match="frame 6"):
        fuse(good, plan, weights, 7)


# ---------------------------------------------------------------- noise

SHAPE = (2, 3, 4)  # (C, H, W)


def test_frame_seed_stable_and_distinct():
    assert frame_seed(7, 3) == frame_seed(7, 3)
    seeds = {frame_seed(s, f) for s in range(5) for f in range(-10, 50)}
    assert len(seeds) == 5 * 60
    assert all(0 <= x < 2**63 for x in seeds)


def test_independent_noise_definition():
    noise = initial_noise(3, 5, SHAPE)
    assert noise.shape == (1, 2, 5, 3, 4) and noise.dtype == torch.float32
    for f in range(5):
        gen = torch.Generator("cpu").manual_seed(frame_seed(3, f))
        assert torch.equal(noise[0, :, f], torch.randn(SHAPE, generator=gen))
    assert initial_noise(3, 5, SHAPE, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_frames_noise_matches_slices(mode):
    rng = random.Random(0)
    for window, overlap in [(16, 4), (8, 0), (5, 4), (4, 1)]:
        full = initial_noise(11, 60, SHAPE, mode, window, overlap)
        assert full.shape == (1, 2, 60, 3, 4)
        for _ in range(15):
            s = rng.randrange(0, 60)
            e = rng.randrange(s, 61)
            part = frames_noise(11, range(s, e), SHAPE, mode, window, overlap)
            assert torch.equal(part, full[:, :, s:e])
        picks = [57, 3, 40, 40, 16]
        assert torch.equal(frames_noise(11, picks, SHAPE, mode, window, overlap), full[:, :, picks])
        # a shorter video is a prefix of a longer one
        assert torch.equal(initial_noise(11, 23, SHAPE, mode, window, overlap), full[:, :, :23])


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_noise_seeds_differ(mode):
    a = initial_noise(1, 40, SHAPE, mode)
    b = initial_noise(2, 40, SHAPE, mode)
    assert not torch.equal(a, b)
    assert not any(torch.equal(a[0, :, f], b[0, :, f]) for f in range(40))


def test_correlated_noise_is_unit_ar1_across_frames_and_beyond_the_horizon():
    """Per-frame variance 1 and lag-k correlation rho^k, at the start, across the horizon and well past it."""
    shape = (4, 64, 64)  # 16k samples per frame: correlations within about 0.02
    rho = NOISE_CORRELATION
    for first in (0, NOISE_HORIZON - 2, 3 * NOISE_HORIZON + 5):
        noise = frames_noise(4, range(first, first + 6), shape, "correlated")[0].transpose(0, 1).flatten(1)  # (6, n)
        assert torch.allclose(noise.std(dim=1), torch.ones(6), atol=0.03)
        for lag in (1, 2, 5):
            corr = torch.corrcoef(torch.stack([noise[0], noise[lag]]))[0, 1].item()
            assert abs(corr - rho**lag) < 0.03, (first, lag, corr)
    # far apart frames are nearly independent, and the mode is not the independent noise
    far = frames_noise(4, [0, 200], shape, "correlated")[0].transpose(0, 1).flatten(1)
    assert abs(torch.corrcoef(far)[0, 1].item()) < 0.03
    assert not torch.equal(initial_noise(4, 3, shape, "correlated"), initial_noise(4, 3, shape))


def test_training_recursion_matches_the_render_noise():
    """The training script's AR(1) recursion gives the noise the engine samples with (frames < horizon)."""
    xi = initial_noise(8, 16, SHAPE)  # independent frames of seed 8
    assert torch.allclose(correlate_frames(xi, dim=2), initial_noise(8, 16, SHAPE, "correlated"), atol=1e-5)


def test_independent_frames_differ():
    noise = initial_noise(5, 30, SHAPE)
    frames = [noise[0, :, f] for f in range(30)]
    assert all(not torch.equal(frames[i], frames[j]) for i in range(30) for j in range(i))


@pytest.mark.parametrize("window, overlap", [(16, 4), (8, 2), (6, 0), (4, 3)])
def test_freenoise_structure(window, overlap):
    f = 70
    free = initial_noise(9, f, SHAPE, "freenoise", window, overlap)
    indep = initial_noise(9, f, SHAPE, "independent")
    assert torch.equal(free[:, :, :window], indep[:, :, :window])
    base = [free[0, :, k] for k in range(window)]
    for frame in range(window, f):
        matches = [k for k in range(window) if torch.equal(free[0, :, frame], base[k])]
        assert len(matches) == 1
    # each full chunk is a permutation of its source chunk
    stride = window - overlap
    for c in range(window, f - stride + 1, stride):
        chunk = {tuple(free[0, :, c + j].flatten().tolist()) for j in range(stride)}
        src = {tuple(free[0, :, c - window + j].flatten().tolist()) for j in range(stride)}
        assert chunk == src
    assert not torch.equal(free, initial_noise(9, f, SHAPE, "independent"))


def test_noise_errors():
    with pytest.raises(ValueError, match="^noise: got 'gaussian'"):
        initial_noise(0, 4, SHAPE, mode="gaussian")
    with pytest.raises(ValueError, match="^overlap: got 8"):
        initial_noise(0, 20, SHAPE, mode="freenoise", window=8, overlap=8)
    with pytest.raises(ValueError, match="^frames: got -1"):
        frames_noise(0, [2, -1], SHAPE)
    assert frames_noise(0, [], SHAPE).shape == (1, 2, 0, 3, 4)


# ---------------------------------------------------------------- prompts

def test_single_key_schedule_bit_identical():
    a, b, alpha = prompt_schedule([PromptKey(1.0, "cat")], 12, 8.0)
    assert a.dtype == b.dtype == torch.int64 and alpha.dtype == torch.float64
    assert a.tolist() == [0] * 12 and b.tolist() == [0] * 12 and alpha.tolist() == [0.0] * 12
    key = torch.randn(1, 7, 5, dtype=torch.bfloat16)
    out = interpolate_embeddings(key, a, b, alpha, 3, 10)
    assert out.shape == (7, 7, 5) and out.dtype == torch.bfloat16
    assert all(torch.equal(out[i], key[0]) for i in range(7))


def test_unblended_rows_are_copies_not_arithmetic():
    # any arithmetic (e.g. 1 * E_a + 0 * E_b) would turn inf into nan
    keys = [PromptKey(0.0, "a"), PromptKey(1.0, "b")]
    a, b, alpha = prompt_schedule(keys, 6, 2.0)  # t = 0, .5, 1, 1.5, 2, 2.5
    emb = torch.tensor([[float("inf"), 1.0], [2.0, float("-inf")]])
    out = interpolate_embeddings(emb, a, b, alpha, 0, 6)
    assert torch.equal(out[0], emb[0]) and torch.equal(out[2:], emb[1].expand(4, 2))
    assert out[1].tolist() == [float("inf"), float("-inf")]  # blended: .5 * inf + .5 * 2, ...


def test_two_keys_schedule():
    keys = [PromptKey(0.0, "a"), PromptKey(2.0, "b")]
    a, b, alpha = prompt_schedule(keys, 12, 4.0)
    assert alpha[[0, 2, 4, 6]].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert alpha.tolist() == [k / 8 for k in range(8)] + [0.0] * 4
    assert a.tolist() == [0] * 8 + [1] * 4
    assert b.tolist() == [0] + [1] * 11
    emb = torch.randn(2, 3, 4)
    out = interpolate_embeddings(emb, a, b, alpha, 0, 12)
    assert torch.equal(out[0], emb[0])
    for f in range(8, 12):
        assert torch.equal(out[f], emb[1])
    for f in range(1, 8):
        expect = (1 - f / 8) * emb[0] + (f / 8) * emb[1]
        assert torch.allclose(out[f], expect, atol=1e-6)
    assert torch.equal(interpolate_embeddings(emb, a, b, alpha, 5, 9), out[5:9])


def test_schedule_before_first_and_exact_key():
    keys = [PromptKey(0.5, "a"), PromptKey(1.0, "b"), PromptKey(2.0, "c")]
    a, b, alpha = prompt_schedule(keys, 10, 4.0)  # t = 0, .25, .5, .75, 1, 1.25, ...
    assert list(zip(a.tolist(), b.tolist())) == [
        (0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (1, 2), (1, 2), (2, 2), (2, 2)]
    assert alpha.tolist() == [0, 0, 0, 0.5, 0, 0.25, 0.5, 0.75, 0, 0]


@pytest.mark.parametrize("times, field", [([1.0, 0.5], "timeline[1].at"),
                                          ([0.0, 1.0, 1.0], "timeline[2].at")])
def test_schedule_rejects_unsorted(times, field):
    keys = [PromptKey(t, str(i)) for i, t in enumerate(times)]
    with pytest.raises(ValueError) as err:
        prompt_schedule(keys, 8, 4.0)
    assert str(err.value).startswith(f"{field}: got ")


def test_schedule_rejects_empty_and_bad_fps():
    with pytest.raises(ValueError, match="^timeline: got"):
        prompt_schedule([], 8, 4.0)
    with pytest.raises(ValueError, match="^fps: got 0"):
        prompt_schedule([PromptKey(0.0, "a")], 8, 0)


# ---------------------------------------------------------------- loops: circular plans


@pytest.mark.parametrize("frames,window,overlap", [(2, 16, 4), (16, 16, 4), (17, 16, 4), (40, 16, 4), (64, 8, 3),
                                                   (33, 16, 0), (9, 3, 2)])
def test_loop_plan_covers_the_circle_and_joins_its_ends(frames, window, overlap):
    plan = plan_loop(frames, window, overlap)
    assert len(plan) >= 2
    covered = [0] * frames
    for start, end in plan:
        assert 0 <= start < frames and end - start == min(window, frames)
        for f in range(start, end):
            covered[f % frames] += 1
    assert min(covered) >= 1
    # the last and the first frame are neighbours inside some window
    assert any(start <= frames - 1 < end - 1 for start, end in plan if end > frames)
    starts = [s for s, _ in plan]
    assert starts == sorted(set(starts)) and max(b - a for a, b in zip(starts, starts[1:] + [starts[0] + frames])) \
        <= window - overlap or frames <= window  # spread evenly at the plan's stride


def test_loop_fusion_wraps_and_equals_a_rotated_plain_fusion():
    frames, plan = 20, plan_loop(20, 8, 2)
    z = torch.randn(1, 3, frames, 2, 2, dtype=torch.float64)
    preds = [take_window(z, s, e) * (i + 1) for i, (s, e) in enumerate(plan)]  # distinct per window
    weights = window_weights(plan, "pyramid", loop=frames)
    fused = fuse(preds, plan, weights, frames, loop=True)
    num = torch.zeros_like(z)
    den = torch.zeros(frames, dtype=torch.float64)
    for (s, e), p, w in zip(plan, preds, weights):
        for k, f in enumerate(range(s, e)):
            num[:, :, f % frames] += p[:, :, k] * w[k]
            den[f % frames] += w[k]
    assert torch.allclose(fused, num / den.view(1, 1, -1, 1, 1))
    with pytest.raises(ValueError, match="expected end <= num_frames"):
        fuse(preds, plan, weights, frames)  # a wrapping plan needs loop=True


def test_loop_overlap_linear_weights_ramp_across_the_wrap():
    plan = plan_loop(24, 8, 2)
    weights = window_weights(plan, "overlap-linear", loop=24)
    first_in = plan[-1][1] - 24 - plan[0][0]  # frames the last window shares with the first
    assert first_in > 0 and weights[0][0] < 1 and weights[-1][-1] < 1
    assert all(w.min() > 0 for w in weights)


def test_loop_prompt_schedule_returns_to_the_first_key_at_the_end():
    keys = [PromptKey(0.0, "a"), PromptKey(2.0, "b")]
    a, b, alpha = prompt_schedule(keys, 16, 4.0, loop=True)  # 4 s: b at 2 s, back towards a until 4 s
    assert (a[8], b[8], alpha[8].item()) == (1, 1, 0.0)
    assert (a[12], b[12], alpha[12].item()) == (1, 0, 0.5)  # 3 s: halfway from b back to a
    plain = prompt_schedule(keys, 16, 4.0)
    assert plain[2][12].item() == 0.0 and plain[0][12] == plain[1][12] == 1  # without a loop: stays on b
    emb = torch.randn(2, 3, 4)
    wrapped = interpolate_embeddings(emb, a, b, alpha, 14, 18)  # a window over the wrap: frames 14, 15, 0, 1
    assert torch.equal(wrapped[2], emb[0]) and torch.allclose(wrapped[0], 0.25 * emb[1] + 0.75 * emb[0])  # 3.5 s
    with pytest.raises(ValueError, match="start, end"):
        interpolate_embeddings(emb, a, b, alpha, 3, 20)  # longer than the clip


def test_indexed_frames_are_the_rgb_frames_exactly_in_a_third_of_the_bytes():
    """core/frames.py: drawn frames held and sent as palette indices; slices, index lists, iteration and the
    digest behave as the RGB frames' would."""
    import hashlib

    import numpy as np

    from longtake.core.frames import GRAY, Indexed, as_indexed, update_digest

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (7, 3), dtype=np.uint8)
    frames = Indexed(rng.integers(0, 7, (70, 6, 5), dtype=np.uint8), palette)  # more than one digest chunk
    rgb = palette[frames.index]
    assert np.array_equal(np.asarray(frames), rgb) and frames.shape == rgb.shape and len(frames) == 70
    assert frames.nbytes < rgb.nbytes / 2
    assert np.array_equal(np.asarray(frames[3:9]), rgb[3:9])
    assert np.array_equal(np.asarray(frames[[5, 0, 69]]), rgb[[5, 0, 69]])
    assert all(np.array_equal(a, b) for a, b in zip(frames, rgb))
    one, other = hashlib.sha256(), hashlib.sha256()
    update_digest(one, frames)
    update_digest(other, rgb)
    assert one.hexdigest() == other.hexdigest() == hashlib.sha256(rgb.tobytes()).hexdigest()

    grey = np.repeat(rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8), 3, axis=3)
    held = as_indexed(grey)
    assert isinstance(held, Indexed) and held.palette is GRAY and np.array_equal(np.asarray(held), grey)
    colour = grey.copy()
    colour[2, 1, 1, 0] ^= 1  # one pixel that is not grey: kept as RGB, untouched
    assert as_indexed(colour) is colour and as_indexed(None) is None and as_indexed(held) is held
