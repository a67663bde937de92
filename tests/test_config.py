"""Config validation and the flat-flag round trip."""

import json

import pytest

from uhga_tf import config


def test_flat_round_trip_through_json():
    experiment = config.experiment_from_flat(
        {"code_length": 32, "epochs": 3, "attention": False, "seed": 7}
    )
    restored = config.experiment_from_dict(json.loads(experiment.to_json()))
    assert restored == experiment
    assert restored.model.code_length == 32
    assert restored.attention.attention is False
    assert restored.train.seed == 7


def test_every_field_is_one_flag():
    names = [name for name, *_ in config.flag_specs()]
    assert len(names) == len(set(names))
    assert {"code_length", "similarity_lambda", "lookahead", "strategy",
            "workdir"} <= set(names)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"code_length": 12}, "code_length must be a multiple of 8"),
        ({"code_length": 2048}, "code_length must be a multiple of 8"),
        ({"code_length": 0}, "code_length must be a multiple of 8"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"attention_learning_rate": -1.0},
         "attention_learning_rate must be > 0"),
        ({"global_batch_size": 1}, "global_batch_size must be >= 2"),
        ({"global_batch_size": 7}, "must be even with pairing=cross"),
        ({"strategy": "tpu"}, "strategy must be one of"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"similarity": "spectral"}, "similarity must be one of"),
        ({"positive_weight": "many"}, "positive_weight must be"),
        ({"dataset": "mnist"}, "dataset must be one of"),
        ({"train_size": -1}, "train_size must be an int >= 0"),
        ({"similarity_centring": 1.5}, "similarity_centring must be in"),
        ({"code_lenght": 64}, "unknown config fields: code_lenght"),
    ],
)
def test_bad_values_name_the_field(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        config.experiment_from_flat(values)
