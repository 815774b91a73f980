import json
import subprocess
import sys

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


def test_core_imports_without_ray():
    code = (
        "import sys, medcae.model.backbones, medcae.model.cae, medcae.model.epoch, medcae.model.classifier, "
        "medcae.model.features, medcae.inference.bundle, medcae.inference.predictor, medcae.data, "
        "medcae.evaluation.protocol, medcae.metrics.classification, medcae.cli.errors, medcae.tuning.space, medcae.tuning.report, "
        "medcae.serving.api, medcae.serving.client, medcae.cli.main, medcae.evaluation.comparison, medcae.model.trainer, "
        "medcae.data.shards, medcae.data.preprocess, medcae.cli.args, medcae.data.rows, medcae.labeling.study; "
        "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
