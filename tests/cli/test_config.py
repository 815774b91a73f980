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
