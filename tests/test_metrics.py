"""memcore.metrics: every formula against a float64 reference, the preprocessing against transforms
built by hand, and the one-line errors for missing or broken weights. Models are tiny random
stand-ins built here (no download)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memcore import metrics
from memcore.errors import MemcoreError
from standins import TinyDescriptor, TinyInception, build_clip, write_inception, write_sscd


# --- SSCD: loading --------------------------------------------------------------------------------


@pytest.fixture
def sscd_file(tmp_path):
    return write_sscd(tmp_path / "sscd_disc_mixup.torchscript.pt")


def _one_line(error: MemcoreError) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_load_sscd_reads_torchscript_on_cpu(sscd_file):
    model = metrics.load_sscd(sscd_file)
    reference = TinyDescriptor()
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(model(x), reference(x))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not model.training


def test_load_sscd_missing_file_is_one_line(tmp_path):
    path = tmp_path / "nowhere" / "sscd.pt"
    with pytest.raises(MemcoreError) as caught:
        metrics.load_sscd(path)
    text = _one_line(caught.value)
    assert str(path) in text and metrics.SSCD_URL in text
    assert caught.value.param == "sscd"


@pytest.mark.parametrize("content", ["state_dict", "garbage", "empty", "folder"])
def test_load_sscd_not_torchscript_is_one_line(tmp_path, content):
    path = tmp_path / "sscd.pt"
    if content == "state_dict":
        torch.save(TinyDescriptor().state_dict(), path)
    elif content == "garbage":
        path.write_bytes(b"\x00not a zip\n" * 10)
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    with pytest.raises(MemcoreError) as caught:
        metrics.load_sscd(path)
    text = _one_line(caught.value)
    assert str(path) in text and metrics.SSCD_URL in text


# --- SSCD: preprocessing --------------------------------------------------------------------------


def test_wen_preprocessing_crops_the_centre_exactly():
    # 256 x 300: the shorter side is already 256, so the resize is the identity and the crop is
    # rows 16..240, columns 38..262 (torchvision: round((256-224)/2) = 16, round((300-224)/2) = 38).
    x = torch.rand(2, 3, 256, 300, dtype=torch.float64)
    got = metrics.sscd_preprocess(x, "wen")
    expected = (x[..., 16:240, 38:262] - 0.5) / 0.5
    assert got.shape == (2, 3, 224, 224)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape,resized", [((512, 512), (256, 256)), ((480, 640), (256, 341)), ((700, 500), (358, 256))])
def test_wen_preprocessing_matches_hand_built_transform(shape, resized):
    x = torch.rand(1, 3, *shape, dtype=torch.float64)
    r = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=True)
    top, left = round((resized[0] - 224) / 2), round((resized[1] - 224) / 2)
    expected = (r[..., top : top + 224, left : left + 224] - 0.5) / 0.5
    assert torch.equal(metrics.sscd_preprocess(x, "wen"), expected)


def test_sscd_preprocessing_matches_hand_built_transform():
    x = torch.rand(2, 3, 200, 300, dtype=torch.float64)
    r = F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    expected = torch.stack([(r[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(metrics.sscd_preprocess(x, "sscd"), expected, rtol=0, atol=1e-15)
    # 320 x 320 input: no resize at all, only the normalization
    y = torch.rand(1, 3, 320, 320, dtype=torch.float64)
    torch.testing.assert_close(
        metrics.sscd_preprocess(y, "sscd"), (y - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), rtol=0, atol=1e-15
    )


def test_preprocessing_rejects_unknown_name_and_bad_images():
    with pytest.raises(MemcoreError, match="preprocessing: must be one of wen, sscd"):
        metrics.sscd_preprocess(torch.rand(1, 3, 8, 8), "dcr")
    with pytest.raises(ValueError, match="images"):
        metrics.sscd_preprocess(torch.rand(3, 8, 8), "wen")
    with pytest.raises(ValueError, match="images"):
        metrics.sscd_preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "wen")


# --- SSCD: embeddings, similarity, summaries ------------------------------------------------------


@pytest.mark.parametrize("preprocessing", ["wen", "sscd"])
def test_sscd_embed_is_normalized_model_output(sscd_file, preprocessing):
    model = metrics.load_sscd(sscd_file)
    images = torch.rand(5, 3, 64, 80)
    got = metrics.sscd_embed(model, images, preprocessing, batch_size=2)
    raw = model(metrics.sscd_preprocess(images, preprocessing)).double()
    expected = raw / raw.norm(dim=1, keepdim=True)
    assert got.shape == (5, 8)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)


def test_sscd_similarity_and_scores_against_float64_loops():
    torch.manual_seed(1)
    gen, ref = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    sim = metrics.sscd_similarity(gen, ref)
    for i in range(4):
        for j in range(3):
            cos = float(gen[i] @ ref[j]) / (float(gen[i].norm()) * float(ref[j].norm()))
            assert abs(float(sim[i, j]) - cos) < 1e-12
    scores = metrics.sscd_scores(gen, ref)
    assert torch.equal(scores, torch.stack([sim[i].max() for i in range(4)]))
    with pytest.raises(ValueError, match="ground-truth"):
        metrics.sscd_scores(gen, ref[:0])


def test_summarize_sscd():
    scores = torch.tensor([[0.9, 0.5, 0.71], [0.2, 0.4, 0.7]])
    summary = metrics.summarize_sscd(scores)
    assert summary.per_prompt == pytest.approx(((0.9 + 0.5 + 0.71) / 3, (0.2 + 0.4 + 0.7) / 3), abs=1e-7)
    assert summary.mean == pytest.approx((0.9 + 0.5 + 0.71 + 0.2 + 0.4 + 0.7) / 6, abs=1e-7)
    # strictly above: 0.5 and 0.7 themselves do not count
    assert summary.share_above == {0.5: pytest.approx(3 / 6), 0.7: pytest.approx(2 / 6)}
    one_seed = metrics.summarize_sscd(torch.tensor([0.8, 0.1]))
    assert one_seed.per_prompt == pytest.approx((0.8, 0.1)) and one_seed.share_above[0.7] == 0.5


# --- CLIP score -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    # no resize or crop (the inputs are already 32 x 32): the reference below normalizes by hand
    return build_clip(resize=False)


def test_clip_score_is_the_cosine_of_the_embeddings(tiny_clip):
    model, processor = tiny_clip
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a cat", "the great wave off kanagawa", "x"]
    got = metrics.clip_score(model, processor, images, prompts)
    # reference: the model's own features for the same inputs, normalized and dotted in float64
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = metrics._features(model.get_image_features(pixel_values=(images - mean) / std)).double()
        expected = []
        for i, prompt in enumerate(prompts):
            tok = processor.tokenizer([prompt], return_tensors="pt")
            txt = metrics._features(model.get_text_features(**tok)).double()[0]
            expected.append(float(img[i] @ txt) / (float(img[i].norm()) * float(txt.norm())))
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    assert (got.abs() <= 1).all()


def test_clip_score_runs_a_half_precision_model(tiny_clip):
    model, processor = tiny_clip
    images, prompts = torch.rand(2, 3, 32, 32), ["a cat", "a dog"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    got = metrics.clip_score(half, processor, images, prompts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, metrics.clip_score(model, processor, images, prompts), rtol=0, atol=0.05)


def test_clip_score_checks_its_inputs(tiny_clip):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        metrics.clip_score(model, processor, torch.rand(3, 3, 32, 32), ["a", "b"])


def test_load_clip_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for model_id in ("nobody/no-such-clip", str(tmp_path / "missing-folder")):
        with pytest.raises(MemcoreError) as caught:
            metrics.load_clip(model_id)
        text = _one_line(caught.value)
        assert model_id in text and "hf download" in text
        assert caught.value.param == "clip"


def test_load_clip_reads_a_local_folder(tiny_clip, tmp_path):
    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    loaded, loaded_processor = metrics.load_clip(tmp_path / "clip")
    images = torch.rand(2, 3, 32, 32)
    prompts = ["one", "two"]
    torch.testing.assert_close(
        metrics.clip_score(loaded, loaded_processor, images, prompts),
        metrics.clip_score(model, processor, images, prompts), rtol=0, atol=1e-6,
    )


# --- FID ------------------------------------------------------------------------------------------


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d + 3))
    return a @ a.T / a.shape[1]


def test_frechet_distance_against_eigenvalues_of_the_product():
    rng = np.random.default_rng(0)
    for d in (1, 2, 7, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        # reference: the eigenvalues of s1 @ s2 are real and non-negative; tr sqrt = sum of their roots
        ev = np.linalg.eigvals(s1 @ s2)
        assert np.abs(ev.imag).max() < 1e-9
        tr_sqrt = np.sqrt(np.clip(ev.real, 0, None)).sum()
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - expected) <= 1e-9 * max(1.0, abs(expected)), (d, got, expected)


def test_frechet_distance_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with standard deviations s
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, abs=1e-12)
    # commuting (diagonal) covariances: sum of (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected, abs=1e-12)
    # identical statistics, rank-deficient covariance: 0, up to the square roots of the rounding
    # errors of the 6 zero eigenvalues (about sqrt(eps * tr s) each; sqrt is not Lipschitz at 0)
    rng = np.random.default_rng(1)
    s = _random_cov(rng, 10, rank=4)
    bound = 4 * 10 * np.sqrt(np.finfo(np.float64).eps * np.trace(s))
    assert abs(metrics.frechet_distance(np.ones(10), s, np.ones(10), s)) < bound
    # tr sqrt(s s) = tr s for a PSD s (same bound), and exactly for a full-rank one up to rounding
    assert abs(metrics.trace_sqrt_product(s, s) - np.trace(s)) < bound
    full = _random_cov(rng, 10)
    assert metrics.trace_sqrt_product(full, full) == pytest.approx(np.trace(full), rel=1e-12)


def test_frechet_distance_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = _random_cov(rng, 16), _random_cov(rng, 16)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_checks_shapes():
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariance"):
        metrics.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_fid_statistics_and_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    mu, sigma = metrics.fid_statistics(x)
    xd = x.astype(np.float64)
    centred = xd - xd.sum(axis=0) / 50
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, xd.sum(axis=0) / 50, rtol=0, atol=1e-15)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=0, atol=1e-14)
    path = tmp_path / "ref.npz"
    metrics.save_fid_statistics(path, mu, sigma)
    mu2, sigma2 = metrics.load_fid_statistics(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"]


@pytest.mark.parametrize("case", ["missing", "garbage", "no-sigma", "shape", "nan"])
def test_load_fid_statistics_errors_are_one_line(tmp_path, case):
    path = tmp_path / "stats.npz"
    if case == "garbage":
        path.write_bytes(b"nonsense")
    elif case == "no-sigma":
        np.savez(path, mu=np.zeros(3))
    elif case == "shape":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    elif case == "nan":
        np.savez(path, mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(MemcoreError) as caught:
        metrics.load_fid_statistics(path)
    text = _one_line(caught.value)
    assert str(path) in text and caught.value.param == "fid_reference"
    assert {"no-sigma": "sigma", "shape": "covariance", "nan": "not finite", "missing": "no such file"}.get(case, "") in text


# --- KID ------------------------------------------------------------------------------------------


def _mmd2_loops(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops in float64."""
    m, d = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_mmd2_unbiased_against_loops():
    rng = np.random.default_rng(4)
    for m, d in ((2, 1), (5, 3), (12, 8)):
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d)) + 0.3
        expected = _mmd2_loops(x, y)
        assert abs(metrics.mmd2_unbiased(x, y) - expected) <= 1e-12 * max(1.0, abs(expected))
    # polynomial kernel itself
    x, y = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    k = metrics.polynomial_kernel(x, y)
    assert k[2, 1] == pytest.approx((x[2] @ y[1] / 4 + 1) ** 3, rel=1e-14)


def test_kid_full_subsets_equal_the_full_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((10, 4)), rng.standard_normal((10, 4)) * 1.5
    mean, std = metrics.kid(x, y, subsets=3, subset_size=50)  # m = 10: every subset is a permutation
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-12)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_subsets_follow_the_documented_draw():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((15, 3)), rng.standard_normal((11, 3)) + 1
    mean, std = metrics.kid(x, y, subsets=4, subset_size=6, seed=7)
    draw = np.random.default_rng(7)
    values = []
    for _ in range(4):
        ix = draw.choice(15, 6, replace=False)
        iy = draw.choice(11, 6, replace=False)
        values.append(_mmd2_loops(x[ix], y[iy]))
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-9, abs=1e-14)
    with pytest.raises(ValueError, match="subsets"):
        metrics.kid(x, y, subsets=0)


# --- Inception ------------------------------------------------------------------------------------


def test_load_inception_and_features(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    write_inception(path)
    model = metrics.load_inception(path)
    images = torch.rand(5, 3, 16, 16)
    got = metrics.inception_features(model, images, batch_size=2)
    expected = TinyInception()(torch.round(images * 255), return_features=True).double().detach().numpy()
    assert got.shape == (5, 2048) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_load_inception_errors_are_one_line(tmp_path):
    for path in (tmp_path / "missing.pt", tmp_path / "broken.pt"):
        if path.name == "broken.pt":
            path.write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(MemcoreError) as caught:
            metrics.load_inception(path)
        text = _one_line(caught.value)
        assert str(path) in text and metrics.INCEPTION_URL in text
        assert caught.value.param == "inception"
