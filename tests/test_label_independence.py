"""No label reaches training: permuting the train and validation labels
leaves the learned weights and codes bit for bit the same."""

import numpy as np
import pytest

from train_fixtures import write_feature_file


def _permuted_copy(source, target, seed=3):
    """The same features and split, labels shuffled within train and within
    validation (the labels training could peek at)."""
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays["labels"].copy()
    rng = np.random.default_rng(seed)
    for name in ("train", "validation"):
        rows = arrays[name]
        labels[rows] = labels[rng.permutation(rows)]
    assert not np.array_equal(labels, arrays["labels"])
    np.savez(target, **{**arrays, "labels": labels})


def _run(tmp_path, data, name, attention):
    from uhga_tf import config
    from uhga_tf.training import run as run_lib

    experiment = config.experiment_from_flat(dict(
        dataset="features", data_dir=str(data),
        cache_dir=str(tmp_path / f"cache_{name}"),
        workdir=str(tmp_path / name), code_length=16,
        global_batch_size=32, epochs=2, eval_every_epochs=1,
        learning_rate=0.01, progress=False, attention=attention,
        # The product recipe's S and loss (no class count anywhere).
        similarity="coassociation", similarity_knn=10,
        similarity_cluster_size=10, similarity_runs=2, loss="l2",
        feature_centring=True, positive_weight="auto",
    ))
    result = run_lib.run_experiment(experiment)
    import keras

    hasher = keras.saving.load_model(str(tmp_path / name / "hasher.keras"))
    with np.load(data) as npz:
        codes = run_lib.encode(hasher, npz["features"])
    return result, hasher.get_weights(), codes


@pytest.mark.parametrize("attention", [False, True])
def test_permuted_labels_give_identical_weights_and_codes(tmp_path,
                                                          attention):
    original = write_feature_file(str(tmp_path / "original.npz"))
    permuted = str(tmp_path / "permuted.npz")
    _permuted_copy(original, permuted)
    result_a, weights_a, codes_a = _run(tmp_path, original, "a", attention)
    result_b, weights_b, codes_b = _run(tmp_path, permuted, "b", attention)
    assert len(weights_a) == len(weights_b) > 0
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(codes_a, codes_b)
    # The labels did change what evaluation sees: the guard is not vacuous.
    assert (result_a["similarity_diagnostics"]
            != result_b["similarity_diagnostics"])
