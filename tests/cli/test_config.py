import json

import pytest

from medcae.config import CAEConfig, ClassifierConfig, ConfigError, PipelineConfig


def test_config_round_trips_through_json():
    cfg = PipelineConfig(
        data="x.npz",
        cae=CAEConfig(channels=(16, 8), noise_std=0.2),
        classifier=ClassifierConfig(budget=20),
    )
    again = PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"cae": {"chanels": [1]}}, "chanels"),
        ({"dta": "x"}, "dta"),
        ({"classifier": {"kind": "rf"}}, "kind"),
    ],
)
def test_unknown_or_bad_fields_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig.from_dict(bad)


def test_max_failures_minus_one_means_no_limit_and_below_is_refused():
    from medcae.cli.args import config_from_args
    from medcae.cli.main import build_parser
    from medcae.config import TrainConfig

    assert TrainConfig(max_failures=-1).max_failures == -1  # Ray's FailureConfig: unlimited
    with pytest.raises(ConfigError, match="max_failures must be >= -1, got -2"):
        TrainConfig(max_failures=-2)
    args = build_parser().parse_args(["run", "--max-failures", "-1"])
    assert config_from_args(args).train.max_failures == -1  # what train_cae gives FailureConfig
