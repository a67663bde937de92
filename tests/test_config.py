"""Config validation and the flat-flag round trip."""

import json
import pathlib

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
        ({"similarity_centring": "half"}, "similarity_centring must be a"),
        ({"code_lenght": 64}, "unknown config fields: code_lenght"),
    ],
)
def test_bad_values_name_the_field(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        config.experiment_from_flat(values)


@pytest.mark.parametrize(
    "code_length, centring",
    [(8, 0.0), (16, 0.0), (32, 0.25), (64, 0.5), (128, 0.5), (1024, 0.5)],
)
def test_auto_centring_follows_the_code_length(code_length, centring):
    experiment = config.experiment_from_flat(
        {"code_length": code_length, "similarity_centring": "auto"})
    assert experiment.similarity.similarity_centring == centring


def test_auto_centring_is_stored_as_its_number():
    # A stored config must rerun exactly, and a cell computed with the
    # number before `auto` existed keeps its digest.
    auto = config.experiment_from_flat(
        {"code_length": 64, "similarity_centring": "auto"})
    explicit = config.experiment_from_flat(
        {"code_length": 64, "similarity_centring": 0.5})
    assert auto == explicit
    assert auto.to_dict()["similarity"]["similarity_centring"] == 0.5
    short = config.experiment_from_flat(
        {"code_length": 16, "similarity_centring": "auto"})
    assert config.experiment_from_dict(short.to_dict()) == short


@pytest.mark.parametrize(
    "code_length, learning_rate",
    [(8, 5e-4 / 8 ** 1.5), (16, 6.25e-5), (32, 5e-4 / 2 ** 1.5),
     (64, 5e-4), (128, 5e-4)],
)
def test_auto_learning_rate_follows_the_code_length(code_length,
                                                    learning_rate):
    experiment = config.experiment_from_flat(
        {"code_length": code_length, "learning_rate": "auto"})
    assert experiment.train.learning_rate == pytest.approx(learning_rate)
    # Stored as its number, so a saved config reruns exactly.
    assert config.experiment_from_dict(experiment.to_dict()) == experiment
    assert experiment.to_dict()["train"]["learning_rate"] == pytest.approx(
        learning_rate, rel=1e-12)


def test_learning_rate_flag_text_and_bad_values():
    assert config.experiment_from_flat(
        {"learning_rate": "0.02"}).train.learning_rate == 0.02
    for text, fragment in (("fast", "or 'auto'"), ("0", "> 0"),
                           ("-1e-3", "> 0"), ("nan", "finite")):
        with pytest.raises(ValueError, match=fragment):
            config.experiment_from_flat({"learning_rate": text})


def test_auto_centring_needs_a_code_length():
    import numpy as np

    from uhga_tf import similarity

    section = config.SimilarityConfig(
        similarity="coassociation", similarity_centring="auto")
    with pytest.raises(ValueError, match="follows the code length"):
        similarity.build(section, np.ones((8, 4), np.float32), seed=0)


_CONFIGS = sorted(
    (pathlib.Path(__file__).parents[1] / "configs").rglob("*.flags"))


@pytest.mark.parametrize("path", _CONFIGS, ids=lambda p: p.name
                         if p.parent.name == "configs"
                         else f"{p.parent.name}/{p.name}")
def test_every_shipped_flag_file_parses_to_a_config(path):
    # A stray line in a flag file becomes a positional argument and stops
    # absl's parsing there, so `train` refuses the whole file; every line
    # must be a comment or a known flag, and the result a valid config.
    from absl import flags

    from uhga_tf import flags_util

    flag_values = flags.FlagValues()
    flags_util.define_config_flags(flag_values)
    rest = flag_values(["train", f"--flagfile={path}"])
    assert rest == ["train"]
    experiment = config.experiment_from_flat(
        flags_util.config_values(flag_values))
    assert experiment.model.code_length % 8 == 0
    # No shipped recipe is given the class count: S's cluster count is
    # read from the graph (0), and `classes` keeps every class.
    assert experiment.similarity.similarity_clusters == 0
    assert experiment.data.classes == ""


def test_with_values_replaces_only_the_named_fields():
    base = config.experiment_from_flat(
        {"code_length": 32, "seed": 1, "workdir": "runs/a"})
    changed = config.with_values(
        base, {"seed": 7, "workdir": "runs/b", "trainable_backbone": True})
    assert (changed.train.seed, changed.workdir) == (7, "runs/b")
    assert changed.model.trainable_backbone
    assert changed.model.code_length == 32
    assert config.with_values(changed, {
        "seed": 1, "workdir": "runs/a", "trainable_backbone": False,
    }) == base
    with pytest.raises(ValueError, match="unknown config fields: sede"):
        config.with_values(base, {"sede": 2})


def test_fine_tune_flag_file_is_the_fine_tune_recipe():
    """configs/fine_tune.flags spells out config.FINE_TUNE_RECIPE, the
    stage one that benchmarks/quality.py --fine_tuned_backbone runs."""
    from absl import flags

    from uhga_tf import flags_util

    path = pathlib.Path(__file__).parents[1] / "configs" / "fine_tune.flags"
    flag_values = flags.FlagValues()
    flags_util.define_config_flags(flag_values)
    flag_values(["train", f"--flagfile={path}"])
    from_file = config.experiment_from_flat(
        flags_util.config_values(flag_values))
    assert from_file == config.with_values(
        config.experiment_from_flat({}), config.FINE_TUNE_RECIPE)
    assert from_file != config.experiment_from_flat({})
