"""SSIM and PSNR against scikit-image on real images, and re-identification on cases whose answer is known."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medpfl.data import ImageDataset, sample_items
from medpfl.data.embedded import embedded_source
from medpfl.metrics.chance import label_chance, pooled_label_chance
from medpfl.metrics.image import psnr, ssim
from medpfl.metrics.privacy import reidentified


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    """24 real embedded images, 3 x 32 x 32, every modality."""
    source = embedded_source()
    items = sample_items(source.items, 24, seed=11)
    return ImageDataset(source, items, size=32).load_batch(range(24))[0]


def pairs(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals against: other real images, noisy copies (leaving [0,1]: clamped), blurred copies, themselves
    shifted a pixel: scores from near 0 to near 1."""
    g = torch.Generator().manual_seed(0)
    noisy = real + 0.1 * torch.randn(real.shape, generator=g)
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    shifted = real.roll(1, dims=-1)
    a = torch.cat([real, real, real, real])
    b = torch.cat([real.roll(1, dims=0), noisy, blurred, shifted])
    return a, b


def test_ssim_equals_scikit_image_on_real_images(real):
    a, b = pairs(real)
    ours = ssim(a, b)
    theirs = torch.tensor([structural_similarity(
        x.clamp(0, 1).permute(1, 2, 0).double().numpy(), y.clamp(0, 1).permute(1, 2, 0).double().numpy(),
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)
        for x, y in zip(a, b)], dtype=torch.float32)
    assert theirs.min() < 0.3 and theirs.max() > 0.9  # the pairs span the scale
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert torch.allclose(ssim(real, real), torch.ones(len(real)))


def test_psnr_equals_scikit_image_on_real_images(real):
    a, b = pairs(real)
    ours = psnr(a, b)
    theirs = torch.tensor([peak_signal_noise_ratio(x.clamp(0, 1).double().numpy(), y.clamp(0, 1).double().numpy(),
                                                   data_range=1) for x, y in zip(a, b)], dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_a_perfect_reconstruction_is_always_reidentified(real):
    picked = torch.tensor([3, 0, 17, 23, 8])
    assert reidentified(real[picked], picked, real).all()


def test_random_reconstructions_are_reidentified_at_chance(real):
    """A rate means something only against chance: noise finds its 'original' 1 / gallery size of the time."""
    g = torch.Generator().manual_seed(1)
    gallery = torch.nn.functional.avg_pool2d(real[:8], 2)  # 16 x 16 keeps it cheap
    noise = torch.rand(240, *gallery.shape[1:], generator=g)
    truth = torch.randint(0, len(gallery), (240,), generator=g)
    rate = float(reidentified(noise, truth, gallery).float().mean())
    assert abs(rate - 1 / len(gallery)) < 0.06  # 1/8 +- 2.6 standard deviations


def test_near_duplicates_in_the_gallery(real):
    """A close look-alike beside the original: the better reconstruction decides; an exact copy ties and
    the original counts as found."""
    original, other = real[0], real[1:6]
    near = (original + 0.05 * torch.randn(original.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    gallery = torch.stack([original, near, *other])
    assert reidentified(original[None], torch.tensor([0]), gallery).all()
    assert not reidentified(near[None], torch.tensor([0]), gallery).any()  # it is the look-alike's picture
    with_copy = torch.stack([original, *other, original])
    assert reidentified(original[None], torch.tensor([len(with_copy) - 1]), with_copy).all()


def _enumerated_label_chance(true_labels: list[int], num_classes: int) -> float:
    """Every possible guess of B labels (K^B, equally likely), scored as multisets: shared labels / B."""
    guesses = itertools.product(range(num_classes), repeat=len(true_labels))
    truth = Counter(true_labels)
    scores = [sum((truth & Counter(g)).values()) / len(true_labels) for g in guesses]
    return sum(scores) / len(scores)


@pytest.mark.parametrize("true_labels", [[3], [0, 1], [2, 2], [0, 1, 2, 3], [1, 1, 4, 5], [5, 5, 5, 5], [0, 0, 1]])
def test_label_chance_equals_enumerating_every_guess(true_labels):
    assert label_chance(true_labels, 6) == pytest.approx(_enumerated_label_chance(true_labels, 6), abs=1e-12)


def test_label_chance_of_a_batch_is_above_one_in_k():
    """Averaged over true labels drawn uniformly too: 1/6 for one image, 0.282 for two and 0.429 for four of
    six classes (hand count for two: distinct labels, 5/6 of batches, score 1 - (5/6)^2 = 11/36 each;
    a repeated label scores 1/6)."""
    def over_truths(B: int) -> float:
        truths = list(itertools.product(range(6), repeat=B))
        return sum(label_chance(list(t), 6) for t in truths) / len(truths)

    assert over_truths(1) == pytest.approx(1 / 6)
    assert over_truths(2) == pytest.approx(5 / 6 * 11 / 36 + 1 / 6 * 1 / 6) == pytest.approx(0.2824, abs=1e-4)
    assert over_truths(4) == pytest.approx(0.4286, abs=1e-4)
    # Pooled over batches: each batch weighted by its images.
    assert pooled_label_chance([[0, 1], [2, 2]], 6) == pytest.approx((11 / 36 + 1 / 6) / 2)


def test_the_chance_of_a_random_image_averages_over_every_other_image_of_the_gallery():
    """An attacker answering with a random image of the data: its chance ASR and mean SSIM are averages over the
    other images, not one draw each (with one draw, which partner an image happened to get decided the rate)."""
    from medpfl.experiments.attack_run import _random_guess_ssim

    images = ImageDataset(embedded_source(), sample_items(embedded_source().items, 5, seed=3), size=16)
    gallery = torch.stack([images.image(i) for i in range(len(images))])
    twin = (gallery[0] + 0.01 * torch.randn(gallery[0].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    gallery = torch.cat([gallery, twin[None]])  # image 0 has a near copy among the others
    pairs = [[structural_similarity(gallery[i].permute(1, 2, 0).double().numpy(),
                                    gallery[j].permute(1, 2, 0).double().numpy(), channel_axis=2, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
              for j in range(len(gallery)) if j != i] for i in range(2)]
    assert sum(s >= 0.9 for s in pairs[0]) == 1 and max(pairs[1]) < 0.9
    for seed in range(4):  # every other image is a partner here, whatever the seed
        guess = _random_guess_ssim(gallery[:2], gallery, seed)
        assert guess.shape == (2, 5)
        assert float((guess >= 0.9).float().mean()) == pytest.approx(1 / 10)
        assert float(guess.mean()) == pytest.approx(sum(map(sum, pairs)) / 10, abs=1e-6)
    many = _random_guess_ssim(gallery[:2], gallery, 0, partners=3)  # a draw of 3 partners, never the image itself
    assert many.shape == (2, 3) and float(many[0].max()) < 0.999
