import pytest

from medcae.config import ConfigError, PipelineConfig
from medcae.tuning.space import DEFAULT_SPACE, apply_params, backbone_variants, load_space


def _yaml(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, match",
    [
        ("cae.lerning_rate: {loguniform: [0.001, 0.1]}\n", "cae.lerning_rate"),
        ("cae.lr: {gaussian: [0, 1]}\n", "cae.lr"),
        ("cae.lr: {loguniform: [0, 0.1]}\n", "low > 0"),
        ("cae.noise_std: {uniform: [0.5, 0.1]}\n", "cae.noise_std"),
        ("cae.width: {choice: []}\n", "cae.width"),
        ("backbone.resolution: {int: [64, 224]}\n", "backbone.resolution"),
        ("- just\n- a list\n", "mapping"),
        ("cae.lr: [unclosed\n", "not valid YAML"),
        ("classifier.budget: {choice: [20, 1.5]}\n", r"1\.5 is neither a count per class"),
        ("classifier.budget: {choice: [0, 0.1]}\n", r"0 is neither"),
        ("classifier.budget: {uniform: [0.01, 0.1]}\n", "must be a choice of budgets"),
    ],
)
def test_malformed_space_yaml_names_the_bad_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_yaml(tmp_path, text))


def test_yaml_overrides_the_default_space(tmp_path):
    space = load_space(_yaml(tmp_path, "cae.epochs: {int: [2, 5]}\n"))
    assert space["cae.epochs"] == {"int": [2, 5]}
    assert space["cae.lr"] == DEFAULT_SPACE["cae.lr"]
    assert load_space(None) == DEFAULT_SPACE


def test_apply_params_builds_a_valid_config():
    cfg = apply_params(
        PipelineConfig(),
        {
            "backbone.taps": "stage4+stage5",
            "backbone.resolution": 64,
            "cae.depth": 3,
            "cae.width": 64,
            "cae.latent_channels": 16,
            "cae.lr": 0.01,
            "cae.epochs": 4,
            "classifier.kind": "linear_svm",
            "classifier.C": 0.5,
        },
    )
    assert cfg.backbone.taps == ("stage4", "stage5") and cfg.backbone.resolution == 64
    assert cfg.cae.channels == (64, 32, 16) and cfg.cae.latent_channels == 16
    assert cfg.cae.lr == 0.01 and cfg.cae.epochs == 4
    assert cfg.classifier.kind == "linear_svm" and cfg.classifier.C_grid == (0.5,)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


def test_backbone_variants_cover_every_choice():
    space = {
        "backbone.taps": {"choice": ["stage4", "stage5"]},
        "backbone.resolution": {"choice": [64, 112]},
    }
    got = {(v.taps, v.resolution) for v in backbone_variants(space, PipelineConfig())}
    assert got == {(("stage4",), 64), (("stage4",), 112), (("stage5",), 64), (("stage5",), 112)}


def test_budgets_in_the_space_may_be_counts_per_class_and_fractions(tmp_path):
    space = load_space(_yaml(tmp_path, "classifier.budget: {choice: [5, 10, 20, 50, 0.01, 1.0]}\n"))
    picked = [
        apply_params(PipelineConfig(), {"classifier.budget": b}).classifier.budget
        for b in space["classifier.budget"]["choice"]
    ]
    assert picked == [5, 10, 20, 50, 0.01, 1.0]
    assert [type(b) for b in picked[:4]] == [int] * 4  # counts stay counts (20 != 20%)
