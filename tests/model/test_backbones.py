import pytest
import torch

from medcae.model.backbones import BACKBONES, BackboneError, build_backbone


@pytest.mark.parametrize(
    "tap, resolution, shape",
    [
        ("stage3", 112, (40, 14, 14)),
        ("stage5", 112, (112, 7, 7)),
        ("stage5", 64, (112, 4, 4)),
        ("head", 112, (1280, 4, 4)),
    ],
)
def test_efficientnet_lite0_tap_shapes(tap, resolution, shape):
    bb = build_backbone("efficientnet_lite0", [tap], resolution)
    assert bb.tap_shapes()[tap] == shape


@pytest.mark.parametrize(
    "name, tap, channels",
    [
        ("resnet18", "layer3", 256),
        ("resnet50", "layer2", 512),
        ("densenet121", "block3", 1024),
        ("vgg16", "pool4", 512),
    ],
)
def test_torchvision_taps_with_explicit_random_weights(name, tap, channels):
    bb = build_backbone(name, [tap], 64, weights="random")
    out = bb(torch.zeros(2, 3, 64, 64))
    assert out[tap].shape[:2] == (2, channels)
    assert out["final"].ndim == 2


def test_backbone_is_frozen():
    bb = build_backbone("efficientnet_lite0", ["stage4"], 64)
    bb.train()  # asking for train mode must not unfreeze batch-norm statistics
    assert not bb.training and not any(m.training for m in bb.modules())
    assert all(not p.requires_grad for p in bb.parameters())
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    x = torch.randn(4, 3, 64, 64, requires_grad=True)
    out = bb(x)
    assert not out["stage4"].requires_grad
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_imagenet_weights_are_loaded_not_random():
    a = build_backbone("efficientnet_lite0", ["stage2"], 64)
    b = build_backbone("efficientnet_lite0", ["stage2"], 64)
    r = build_backbone("efficientnet_lite0", ["stage2"], 64, weights="random")
    key = "net.net._conv_stem.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], r.state_dict()[key])


def test_weights_from_a_local_state_dict_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    bb = build_backbone("resnet18", ["layer3"], 64, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(bb.net.state_dict()["conv1.weight"], net.state_dict()["conv1.weight"])


def test_offline_without_cached_weights_is_a_clear_error(tmp_path, monkeypatch):
    """Real download attempt into an empty cache; this machine (and CI) is offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_backbone("resnet18", ["layer3"], 64)
    except BackboneError as err:
        assert "--backbone-weights" in str(err) and "cache" in str(err)
    else:
        pytest.skip("online: torchvision downloaded the weights")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "alexnet"}, "unknown backbone"),
        ({"name": "resnet18", "taps": ["layer9"]}, "no tap"),
        ({"name": "efficientnet_lite0", "resolution": 16}, "resolution"),
        ({"name": "resnet18", "weights": "/nonexistent.pth"}, "not found"),
    ],
)
def test_bad_backbone_requests(kwargs, match):
    with pytest.raises(BackboneError, match=match):
        build_backbone(**kwargs)


def test_registry_names():
    assert {"efficientnet_lite0", "resnet18", "resnet50", "densenet121", "vgg16"} <= set(BACKBONES)
