import numpy as np
import pytest
import torch

from medcae.config import BackboneConfig, CAEConfig
from medcae.model.cae import ConvAutoEncoder
from medcae.model.epoch import build_cae, channel_stats, embed_all, errors_all, run_epoch
from medcae.model.features import FeatureExtractor


@pytest.mark.parametrize(
    "in_ch, hw, channels, latent, down, pool, dim",
    [
        (112, 7, (64,), 16, False, "avg", 16),
        (112, 7, (128, 64), 32, False, "avgmax", 64),
        (40, 14, (32, 16), 8, True, "flatten", 8 * 7 * 7),
        (80, 7, (32,), 8, True, "avg", 8),  # odd size with stride 2: decoder output resized
        (3, 28, (16, 16, 16), 4, False, "avgmax", 8),
    ],
)
def test_cae_shapes(in_ch, hw, channels, latent, down, pool, dim):
    cfg = CAEConfig(channels=channels, latent_channels=latent, downsample=down, pool=pool)
    cae = ConvAutoEncoder(in_ch, cfg)
    x = torch.randn(3, in_ch, hw, hw)
    recon, target = cae(x, noise_std=0.1)
    assert recon.shape == target.shape == x.shape
    assert cae.embed(x).shape == (3, dim)
    assert cae.reconstruction_error(x).shape == (3,)


@pytest.mark.parametrize("kwargs", [{"channels": ()}, {"pool": "median"}, {"epochs": 0}])
def test_bad_cae_config(kwargs):
    with pytest.raises(ValueError):
        CAEConfig(**kwargs)


def test_standardisation_buffers_travel_with_the_state_dict():
    cae = ConvAutoEncoder(4, CAEConfig(channels=(8,), latent_channels=2))
    cae.set_input_stats(torch.arange(4.0), torch.full((4,), 2.0))
    other = ConvAutoEncoder(4, CAEConfig(channels=(8,), latent_channels=2))
    other.load_state_dict(cae.state_dict())
    assert torch.equal(other.input_mean.flatten(), torch.arange(4.0))


def test_channel_stats_match_numpy(rng):
    maps = rng.normal(3.0, 2.0, size=(50, 5, 4, 4)).astype(np.float16)
    mean, std = channel_stats(maps, chunk=7)
    ref = maps.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-4)


def test_run_epoch_accepts_a_plain_list_of_batches_and_loss_falls_on_real_features(demo_npz):
    """Real backbone features of the demo images; the training loss must fall."""
    from medcae.data import load_dataset

    images = load_dataset(str(demo_npz)).splits["train"].images[:192]
    maps = FeatureExtractor(BackboneConfig(taps=("stage4",), resolution=64))(images)["maps"]
    cfg = CAEConfig(channels=(32,), latent_channels=8, pool="avgmax")
    mean, std = channel_stats(maps)
    model = build_cae(maps.shape[1], cfg, mean, std)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [{"maps": torch.from_numpy(maps[i : i + 32]).float()} for i in range(0, 192, 32)]
    first = run_epoch(model, batches, None)["loss"]
    for _ in range(8):
        run_epoch(model, batches, opt, noise_std=0.1)
    last = run_epoch(model, batches, None)["loss"]
    assert last < 0.6 * first, (first, last)
    assert embed_all(model, maps).shape == (192, 16)
    assert errors_all(model, maps).mean() == pytest.approx(last, rel=0.05)


@pytest.mark.parametrize(
    "groups, latent, hw, pool, dim",
    [
        ((3, 5), 4, 4, "flatten", 2 * 4 * 4 * 4),
        ((2, 2, 4), 2, 5, "avgmax", 3 * 2 * 2),
        ((8,), 3, 4, "avg", 3),  # one group: the plain CAE
    ],
)
def test_hierarchical_cae_one_coder_per_tap(groups, latent, hw, pool, dim):
    cfg = CAEConfig(channels=(8,), latent_channels=latent, pool=pool, groups=groups)
    cae = ConvAutoEncoder(sum(groups), cfg).eval()
    x = torch.randn(3, sum(groups), hw, hw)
    recon, target = cae(x)
    assert recon.shape == target.shape == x.shape
    assert cae.embed(x).shape == (3, dim)


def test_hierarchical_codes_of_a_tap_depend_on_that_tap_only():
    cfg = CAEConfig(channels=(8,), latent_channels=2, groups=(3, 5))
    cae = ConvAutoEncoder(8, cfg).eval()
    x = torch.randn(2, 8, 4, 4)
    y = x.clone()
    y[:, 3:] = torch.randn(2, 5, 4, 4)  # only the second tap changes
    zx, zy = cae.encode(x), cae.encode(y)
    assert torch.equal(zx[:, :2], zy[:, :2])  # the first tap's code channels
    assert not torch.allclose(zx[:, 2:], zy[:, 2:])
    # each tap is reconstructed by its own decoder: the first tap's reconstruction is unchanged
    assert torch.equal(cae(x)[0][:, :3], cae(y)[0][:, :3])


def test_hierarchical_groups_must_add_up_to_the_channels():
    with pytest.raises(ValueError, match=r"add up to 8 channels, but the feature maps have 9"):
        ConvAutoEncoder(9, CAEConfig(groups=(3, 5)))


@pytest.mark.parametrize("kwargs", [{"groups": (0, 4)}, {"patience": -1}])
def test_bad_groups_or_patience(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CAEConfig(**kwargs)
