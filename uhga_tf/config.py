"""Typed, validated experiment configuration.

Each section is a frozen dataclass whose fields are documented under
`Attributes:` and checked in `__post_init__`. Field names are unique across
sections, so an entry point can expose every field as a flag of the same name
(`flag_specs`) and rebuild the nested config from the parsed flat values
(`experiment_from_flat`). Defaults follow method.md §10.3 / §15 and the project
defaults of §0.1.
"""

import dataclasses
import json
import math
import os
import typing

from uhga_tf import codes

# The allowed values of every string option, here only: the modules that
# check them (uhga_tf.training.uhga_model, ...) import these tuples.
DATASETS = ("cifar10", "fashion_mnist", "folder", "nus_wide", "features")
DATA_SOURCES = ("auto", "files", "tfds")
SPLIT_PROTOCOLS = (
    "uhga", "disjoint54k", "ssdh_lists", "ga_lists", "nus_wide21", "demo",
    "collection",
)
FOLDER_LABELS = ("auto", "folders", "none")
QUERY_POOLS = ("test", "all")
HASH_HEADS = ("dense", "mlp")
SIMILARITY_MODES = (
    "ssdh", "threshold", "knn", "cluster", "manifold", "multiscale",
    "coassociation",
)
LOSSES = ("ga_logistic", "ssdh_l2", "l2")
PAIRINGS = ("cross", "within")
SCALE_SCHEDULES = ("sqrt_step", "none")
LOOKAHEADS = ("jvp", "second_order")
STRATEGIES = ("default", "mirrored", "multi_worker")
OPTIMIZERS = ("sgd", "adam")
AP_DENOMINATORS = ("retrieved", "min_rk", "all")
EMPTY_QUERY = ("zero", "skip")
FEATURE_RUNTIMES = ("tensorflow", "tflite")


# The product recipe: the best codes we learn inside UHGA's framework, with
# choices beyond the paper (docs/product_recipe.md). Picked on the
# validation split by benchmarks/sweep.py (benchmarks/results/sweeps/);
# configs/cifar.flags spells the same values out.
HASH_INITS = ("random", "structure")

PRODUCT_RECIPE = {
    "similarity": "coassociation",
    "similarity_knn": 10,
    "similarity_cluster_size": 80,
    "similarity_runs": 10,
    "similarity_centring": 1.0,
    "loss": "l2",
    "feature_centring": True,
    "feature_unit_rows": True,
    "hash_init": "structure",
    "dropout_rate": 0.2,
    "positive_weight": "auto",
    "quantization_weight": 0.0,
    "epochs": 8,
    "lr_step_epochs": 30,
    "learning_rate": "auto",
    "attention_learning_rate": 0.05,
}

# Stage one of the two-stage recipe (docs/product_recipe.md section 1l):
# backbone and hash layer trained end to end at 64 bits, without GA, on two
# augmented views of each image in one batch, over the base flags' S.
# Stage two is the product recipe on the fine-tuned backbone's features
# (`backbone_weights`, any code length, S rebuilt on those features beside
# the stock ones: `similarity_stock_features`).
# Picked on the validation split (sweeps finetune_e2e_*, finetuned_features_*).
FINE_TUNE_RECIPE = {
    "trainable_backbone": True,
    "optimizer": "adam",
    "learning_rate": 0.0003,
    "hash_lr_multiplier": 1.0,
    "weight_decay": 0.0,
    "attention": False,
    "image_augmentation": True,
    "paired_views": True,
    "pairing": "within",
    "scale_schedule": "none",
    "epochs": 2,
    "code_length": 64,
}


def check_choice(name, value, choices):
    """Raise ValueError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {', '.join(choices)}; received "
            f"{name}={value!r}"
        )


def _finite(name, value):
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"{name} must be a finite number; received {name}={value!r}"
        )


def _positive(name, value, allow_zero=False):
    _finite(name, value)
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}; received {name}={value!r}")


def _at_least(name, value, bound):
    if value < bound:
        raise ValueError(
            f"{name} must be >= {bound}; received {name}={value}"
        )


def _unset_if_negative(name, value):
    """Optional float: None = unset. A negative value is the sentinel that
    meant "unset" before these fields were Optional (old config.json files,
    old flag files), so it reads as None."""
    if value is None or value < 0:
        return None
    return float(value)


def _number_or_auto(name, value, wanted):
    """None for `auto` (None, "auto"); a float for a number or its text (the
    flag's text, config.json files of older runs)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as e:
            raise ValueError(
                f"{name} must be {wanted} or 'auto'; received "
                f"{name}={value!r}"
            ) from e
    return float(value)


def _positive_or_auto(name, value):
    """A number > 0, or None for `auto`: positive_weight (omega of eq. (6);
    auto is #(S=-1) / #(S=+1)) and learning_rate (auto follows the code
    length, resolved by `ExperimentConfig`)."""
    value = _number_or_auto(name, value, "a positive number")
    if value is not None:
        _positive(name, value)
    return value


def _similarity_centring(name, value):
    """c of the co-association S: None means `auto`, resolved from the code
    length by `ExperimentConfig`."""
    value = _number_or_auto(name, value, "a number in [0, 1]")
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] or 'auto'; received {name}={value!r}")
    return value


def learning_rate_for_code_length(code_length):
    """`learning_rate=auto`: 5e-4 (min(K, 64) / 64)^1.5.

    5e-4 from 64 bits on, 1.77e-4 at 32 and 6.25e-5 at 16. The product
    starts at the k-means+LS map and refines it. The pairwise loss compares
    q_ij / K with s_ij, so one step moves a short code's normalised inner
    products further from that start: on CIFAR-10 validation (3 seeds) 16
    bits score 0.442 / 0.557 / 0.556 (MAP@ALL / MAP@1000 / P@100) at 5e-4,
    0.453 / 0.566 / 0.563 at 1.25e-4 and 0.458 / 0.569 / 0.565 at 6.25e-5;
    32 bits are level between 2.5e-4 and 1.77e-4, and so is Fashion-MNIST
    at both lengths (docs/product_recipe.md section 1j, sweeps
    length_rule_*).
    """
    return 5e-4 * (min(int(code_length), 64) / 64) ** 1.5


def centring_for_code_length(code_length):
    """`similarity_centring=auto`: 0 up to 16 bits, 0.25 at 32, 0.5 from 64.

    The centred S asks unrelated pairs for orthogonal codes. Long codes have
    room for many mutually orthogonal groups, and the centred target then
    orders the top of the list; 16 bits do not, and asking unrelated pairs
    for opposite codes separates the coarse kinds better (validation sweeps
    trust_length_centring*, docs/product_recipe.md section 1g).
    """
    steps = math.log2(max(int(code_length), 16) / 16)
    return 0.25 * min(steps, 2.0)


# Fields whose stored or flag form differs from the config value: name ->
# function(name, value) returning the config value.
_CANONICAL = {
    "ssdh_alpha": _unset_if_negative,
    "ssdh_beta": _unset_if_negative,
    "similarity_threshold": _unset_if_negative,
    "dissimilarity_threshold": _unset_if_negative,
    "positive_weight": _positive_or_auto,
    "similarity_centring": _similarity_centring,
    "learning_rate": _positive_or_auto,
}


def canonical_value(name, value):
    """The config value of a field given as a flag or as config.json holds it.

    Two spellings of the same setting (positive_weight "auto" and None,
    ssdh_alpha -1.0 and None) compare equal after this.
    """
    convert = _CANONICAL.get(name)
    return value if convert is None else convert(name, value)


def _canonicalize(section):
    for field in dataclasses.fields(section):
        if field.name in _CANONICAL:
            value = canonical_value(field.name, getattr(section, field.name))
            object.__setattr__(section, field.name, value)


def class_ids(classes):
    """The class ids of a `classes` string ("0,3,7"); () means all."""
    text = (classes or "").replace(" ", "")
    if not text:
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError as e:
        raise ValueError(
            "classes must be comma-separated class ids such as '0,1,2'; "
            f"received classes={classes!r}"
        ) from e
    if min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(
            "classes must be distinct ids >= 0; received "
            f"classes={classes!r}"
        )
    return ids


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split.

    Attributes:
        dataset: one of `DATASETS`; `features` reads a precomputed .npz
            (see uhga_tf.data.retrieval_sets).
        data_dir: data root; falls back to $UHGA_DATA_DIR when empty.
        data_source: `auto` (local files, else a prepared TFDS copy), `files`
            or `tfds` (may download).
        split: split protocol of protocol.md §1 (`SPLIT_PROTOCOLS`).
        query_pool: pool the CIFAR queries are drawn from (`test`, `all`).
        split_list_dir: folder with GA list files (only `split=ga_lists`).
        cache_dir: where split index files and cached features live.
        skip_corrupt: skip (and count) undecodable images instead of failing.
        classes: keep only these class ids (comma-separated, e.g.
            "0,1,2,3,4"); empty = every class. Defines the collection
            (robustness checks on subsets), never a model parameter.
        class_decay: keep a share decay^c of class c's images (1 = all):
            an imbalanced collection, e.g. 0.7071 keeps 6,000 ... 265
            CIFAR-10 images per class.
        train_size: 0 trains on the split's train set; N > 0 trains on up
            to N images drawn (seeded, label-blind) from the database minus
            the validation queries: the collection a user searches, which
            they hold without labels (product recipe, beyond the paper).
        folder_labels: `folder` only: `folders` (class folders), `none`
            (every image under data_dir, any depth, unlabelled: a user's
            photos, with `split=collection`) or `auto` (unlabelled when
            data_dir holds images and no sub-folders, else class folders).
    """

    dataset: str = "cifar10"
    data_dir: str = ""
    data_source: str = "auto"
    split: str = "uhga"
    query_pool: str = "test"
    split_list_dir: str = ""
    cache_dir: str = "cache"
    skip_corrupt: bool = False
    classes: str = ""
    class_decay: float = 1.0
    train_size: int = 0
    folder_labels: str = "auto"

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("folder_labels", self.folder_labels, FOLDER_LABELS)
        if self.folder_labels != "auto" and self.dataset != "folder":
            raise ValueError(
                "folder_labels applies to dataset=folder only; received "
                f"folder_labels={self.folder_labels!r} with "
                f"dataset={self.dataset!r}")
        if not isinstance(self.train_size, int) or self.train_size < 0:
            raise ValueError(
                "train_size must be an int >= 0 (0: the split's train "
                f"set); received train_size={self.train_size!r}"
            )
        class_ids(self.classes)
        if not 0.0 < self.class_decay <= 1.0:
            raise ValueError(
                "class_decay must be in (0, 1]; received "
                f"class_decay={self.class_decay!r}"
            )
        check_choice("data_source", self.data_source, DATA_SOURCES)
        check_choice("split", self.split, SPLIT_PROTOCOLS)
        check_choice("query_pool", self.query_pool, QUERY_POOLS)
        if self.split == "ga_lists" and not self.split_list_dir:
            raise ValueError(
                "split=ga_lists needs split_list_dir (folder with test.txt, "
                "train.txt, database.txt); received split_list_dir=''"
            )
        if not self.cache_dir:
            raise ValueError("cache_dir must be a path; received ''")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone and hash layer.

    Attributes:
        backbone: feature extractor name (`efficientnet_lite0`, `vgg16`,
            `alexnet`, other `keras.applications` models).
        backbone_weights: `default` (the shipped weights), `imagenet`
            (download), a weights file path, or `random`.
        image_size: backbone input size; 0 means the backbone's default.
        code_length: K, a multiple of 8 in [8, 1024].
        hash_head: `dense` (D -> K) or `mlp` (D -> hash_hidden -> K).
        hash_hidden: hidden width of the `mlp` head.
        trainable_backbone: fine-tune the backbone end to end on images
            (GPU path, method.md §0.1/§6); needs a dataset whose images are
            in memory (cifar10, fashion_mnist), not `features`. The
            similarity matrix still comes from the frozen, cached features.
        dropout_rate: dropout on the features in front of the hash layer;
            one mask per step, shared by every pass of the step (§11). 0 =
            off; the paper's AlexNet uses 0.5.
        feature_centring: subtract the train-feature mean and divide by the
            per-dimension RMS inside the model (beyond the paper,
            docs/product_recipe.md).
        feature_unit_rows: L2-normalise each feature row in front of the
            centring (needs `feature_centring`): the cosine geometry the
            similarity matrix and the structural references use (beyond the
            paper).
        hash_init: `random` (GA-init, the paper) or `structure`: start the
            dense hash layer from the closed-form k-means+LS map of the
            train features on the similarity matrix's kNN graph and cluster
            size (multiscale k-means pseudo-labels, ridge least squares,
            PCA, ITQ rotation; no labels, no class count), then train it
            with the pairwise loss (beyond the paper).
        feature_runtime: how the frozen backbone runs to extract features:
            `tensorflow`, or `tflite` (TFLite's XNNPACK kernels, about
            twice as fast on CPU; features equal up to float rounding,
            cached under their own key; `uhga_tf.models.lite_runtime`).
            The stored results used `tensorflow`.
        image_augmentation: end-to-end path only: every train view is an
            augmented copy of its image, drawn per step from the run's seed
            (a crop of the image reflect-padded by 1/8 of its side, a
            horizontal flip with probability 1/2, contrast x0.8-1.2 and
            brightness +-20 per image; benchmarks/finetune_probe.py, beyond
            the paper).
    """

    backbone: str = "efficientnet_lite0"
    backbone_weights: str = "default"
    image_size: int = 0
    code_length: int = 64
    hash_head: str = "dense"
    hash_hidden: int = 1024
    trainable_backbone: bool = False
    dropout_rate: float = 0.0
    feature_centring: bool = False
    feature_unit_rows: bool = False
    hash_init: str = "random"
    feature_runtime: str = "tensorflow"
    image_augmentation: bool = False

    def __post_init__(self):
        codes.check_code_length(self.code_length)
        check_choice(
            "feature_runtime", self.feature_runtime, FEATURE_RUNTIMES
        )
        check_choice("hash_head", self.hash_head, HASH_HEADS)
        check_choice("hash_init", self.hash_init, HASH_INITS)
        _positive("image_size", self.image_size, allow_zero=True)
        _positive("hash_hidden", self.hash_hidden)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                "dropout_rate must be in [0, 1); received "
                f"dropout_rate={self.dropout_rate!r}"
            )
        if self.feature_unit_rows and not self.feature_centring:
            raise ValueError(
                "feature_unit_rows needs feature_centring; received "
                "feature_unit_rows=True, feature_centring=False"
            )
        if self.image_augmentation and not self.trainable_backbone:
            raise ValueError(
                "image_augmentation changes the images of the end-to-end "
                "path; received image_augmentation=True with "
                "trainable_backbone=False (the frozen path trains on cached "
                "features)"
            )


@dataclasses.dataclass(frozen=True)
class SimilarityConfig:
    """Similarity matrix of eqs. (2)-(3), method.md §5.

    Attributes:
        similarity: `ssdh` (mirrored-Gaussian thresholds) or `threshold`
            (the paper's reading), or a structured S beyond the paper
            (docs/product_recipe.md): `knn` (mutual kNN), `cluster` (k-means ensemble) or
            `manifold` (k-means ensemble in the spectral embedding of
            the kNN graph), `multiscale` or `coassociation` (k-means at 2,
            4, 8, ... clusters in that embedding; the product recipe).
        similarity_lambda: alpha = beta = lambda, the Table-1 parameter
            [inferred].
        ssdh_alpha: overrides alpha when set (unset or negative = use
            lambda).
        ssdh_beta: overrides beta when set (unset or negative = use lambda).
        similarity_threshold: tau_sim for `threshold` mode.
        dissimilarity_threshold: tau_dis for `threshold` mode (unset or
            negative = equal to similarity_threshold).
        similarity_knn: k of the kNN graph (`knn`, `manifold`).
        similarity_clusters: clusters per k-means run (`cluster`,
            `manifold`; also the spectral embedding's dimensions); 0 = read
            the count from the kNN graph (the count whose k-means partition
            has the highest modularity), so no class count is needed.
        similarity_runs: k-means runs; similar = same cluster in all.
        similarity_cluster_span: s >= 1: the k-means runs' cluster counts
            spread geometrically from C to s C (similar = joined at every
            granularity, dissimilar = separated at every one); 1 = all C.
        similarity_dissimilar_quantile: per-row distance quantile beyond
            which a pair is dissimilar (`knn`, `manifold`).
        similarity_cluster_size: `multiscale`, `coassociation`: the ensemble
            runs at 2, 4, 8, ... clusters while the mean cluster holds at
            least this many train items (no class count needed), and in
            any case up to 128 clusters while they hold 10 items on average
            (a small collection; `structured.cluster_scales`).
        similarity_positive_share: `multiscale`: a pair that the same
            cluster holds in at least this share of the (scale, run)
            clusterings is similar.
        similarity_negative_share: `multiscale`: in at most this share,
            dissimilar (in between: unlabeled); < similarity_positive_share.
        similarity_grading: `multiscale`, g in [0, 1]: a similar pair joined
            in a share a of the clusterings gets S = 1 - g (1 - a), so the
            finer the scales that keep it together, the closer it is pulled;
            0 = every similar pair +1.
        similarity_cosine_mix: `coassociation` (S = 2 a - 1 for a pair
            joined in a share a of the multiscale clusterings, every pair
            labelled), m in [0, 1): S = (1 - m)(2 a - 1) + m cos of the
            centred train rows; 0 = the ladder alone.
        similarity_centring: `coassociation`, c in [0, 1]: S = (1 - c)
            (2 a - 1) + c (a - r_i - r_j + r) / (1 - r); the second term is
            the share a less what chance gives a pair of rows with their
            cluster sizes (r_i: row i's mean share, r: their mean), so an
            unrelated pair asks for orthogonal codes, not opposite ones
            (balanced K-bit codes cannot be opposite on average);
            `auto` (None) = `centring_for_code_length` of the experiment's
            code length, resolved when the `ExperimentConfig` is built, so
            stored configs hold the number.
        similarity_learned_share: `multiscale`, `coassociation`, in [0, 1]:
            the coarsest share of the ladder's scales (ceil(share x scales))
            is clustered by linear softmax heads trained on the kNN graph's
            pairs (SCAN-style, `similarity.learned_clusters`) instead of
            k-means in its spectral embedding; with `hash_init=structure`
            the start's pseudo-labels too; 0 = all k-means.
        similarity_stock_features: stage two of the two-stage recipe (a
            frozen run on a fine-tuned backbone's features, set by
            `backbone_weights`): build the kNN graph of S, and of the
            `hash_init=structure` start, on each train row's stock-backbone
            and fine-tuned unit rows side by side (cosine = the mean of the
            two backbones' cosines) instead of the fine-tuned ones alone.
            The head still reads only the fine-tuned features, so the
            exported model is unchanged.
    """

    similarity: str = "ssdh"
    similarity_lambda: float = 0.2
    ssdh_alpha: typing.Optional[float] = None
    ssdh_beta: typing.Optional[float] = None
    similarity_threshold: typing.Optional[float] = None
    dissimilarity_threshold: typing.Optional[float] = None
    similarity_knn: int = 20
    similarity_clusters: int = 0
    similarity_runs: int = 5
    similarity_dissimilar_quantile: float = 0.3
    similarity_cluster_size: int = 40
    similarity_positive_share: float = 0.5
    similarity_negative_share: float = 0.25
    similarity_grading: float = 0.0
    similarity_cluster_span: float = 1.0
    similarity_cosine_mix: float = 0.0
    similarity_centring: typing.Optional[float] = dataclasses.field(
        default=0.0, metadata={"flag": (str, "0")}
    )
    similarity_learned_share: float = 0.0
    similarity_stock_features: bool = False

    def __post_init__(self):
        _canonicalize(self)
        check_choice("similarity", self.similarity, SIMILARITY_MODES)
        if not 0.0 <= self.similarity_learned_share <= 1.0:
            raise ValueError(
                "similarity_learned_share must be in [0, 1]; received "
                f"similarity_learned_share={self.similarity_learned_share!r}")
        if self.similarity_learned_share and self.similarity not in (
                "multiscale", "coassociation"):
            raise ValueError(
                "similarity_learned_share > 0 needs similarity=multiscale or"
                f" coassociation (a ladder); received similarity="
                f"{self.similarity!r}")
        _positive("similarity_knn", self.similarity_knn)
        if self.similarity_clusters != 0:
            _at_least("similarity_clusters", self.similarity_clusters, 2)
        _at_least("similarity_cluster_span", self.similarity_cluster_span,
                  1.0)
        _positive("similarity_runs", self.similarity_runs)
        _positive("similarity_cluster_size", self.similarity_cluster_size)
        if not 0.0 <= self.similarity_cosine_mix < 1.0:
            raise ValueError(
                "similarity_cosine_mix must be in [0, 1); received "
                f"similarity_cosine_mix={self.similarity_cosine_mix!r}")
        if not 0.0 <= self.similarity_grading <= 1.0:
            raise ValueError(
                "similarity_grading must be in [0, 1]; received "
                f"similarity_grading={self.similarity_grading!r}")
        if not (0.0 <= self.similarity_negative_share
                < self.similarity_positive_share <= 1.0):
            raise ValueError(
                "multiscale shares must satisfy 0 <= "
                "similarity_negative_share < similarity_positive_share <= 1;"
                f" received {self.similarity_negative_share} and "
                f"{self.similarity_positive_share}"
            )
        quantile = self.similarity_dissimilar_quantile
        if not 0.0 < quantile < 1.0:
            raise ValueError(
                "similarity_dissimilar_quantile must be in (0, 1); received "
                f"similarity_dissimilar_quantile={quantile!r}"
            )
        _positive("similarity_lambda", self.similarity_lambda, True)
        if self.similarity == "threshold" and (
            self.similarity_threshold is None
            or not 0.0 <= self.similarity_threshold <= 1.0
        ):
            raise ValueError(
                "similarity=threshold needs similarity_threshold in [0, 1]; "
                f"received similarity_threshold={self.similarity_threshold}"
            )


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Pairwise loss, method.md §7 and §14.

    Attributes:
        loss: `ga_logistic` (eq. 7), `ssdh_l2` (eq. 22) or `l2` (eq. 22
            on every pair, weight 1; for the graded `coassociation` S).
        sigmoid_param: gamma of eq. (7).
        positive_weight: omega of eq. (6), a float > 0, or `auto` =
            #(S=-1) / #(S=+1) (stored as None, null in config.json).
        pairing: `cross` (two shuffled branches) or `within`.
        quantization_weight: weight of mean((|u| - 1)^2); 0 = off.
        balance_weight: weight of the bit-balance term mean_k (batch mean
            of u_k)^2 (beyond the paper, docs/product_recipe.md); 0 = off.
        scale_schedule: `sqrt_step` (eq. 4) or `none` (s_t = 1).
        scale_step, scale_gamma, scale_power: constants of eq. (4).
    """

    loss: str = "ga_logistic"
    sigmoid_param: float = 0.2
    positive_weight: typing.Optional[float] = dataclasses.field(
        default=10.0, metadata={"flag": (str, "10")}
    )
    pairing: str = "cross"
    quantization_weight: float = 0.0
    balance_weight: float = 0.0
    scale_schedule: str = "sqrt_step"
    scale_step: int = 200
    scale_gamma: float = 0.005
    scale_power: float = 0.5

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        _positive("sigmoid_param", self.sigmoid_param)
        _canonicalize(self)
        check_choice("pairing", self.pairing, PAIRINGS)
        _positive("quantization_weight", self.quantization_weight, True)
        _positive("balance_weight", self.balance_weight, True)
        check_choice("scale_schedule", self.scale_schedule, SCALE_SCHEDULES)
        _positive("scale_step", self.scale_step)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Gradient attention, method.md §9-§11.

    Attributes:
        attention: train with gradient attention (Ours+GA) or not (Ours).
        lookahead: `jvp` (eq. 19') or `second_order` (literal).
        attention_hidden: hidden width of the 5 -> hidden -> 1 MLP.
        attention_grad_p: p of the gradient preprocessing (12).
        attention_budget: budget factor of eq. (15).
        attention_learning_rate: Adam learning rate of eq. (20).
        attention_chunk_rows: rows of i per attention chunk; 0 = no chunks.
    """

    attention: bool = True
    lookahead: str = "jvp"
    attention_hidden: int = 100
    attention_grad_p: float = 10.0
    attention_budget: float = 2.0
    attention_learning_rate: float = 0.05
    attention_chunk_rows: int = 0

    def __post_init__(self):
        check_choice("lookahead", self.lookahead, LOOKAHEADS)
        _positive("attention_hidden", self.attention_hidden)
        _positive("attention_grad_p", self.attention_grad_p)
        _positive("attention_budget", self.attention_budget)
        _positive("attention_learning_rate", self.attention_learning_rate)
        _positive("attention_chunk_rows", self.attention_chunk_rows, True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation (eq. 18), schedule, distribution and bookkeeping.

    Attributes:
        epochs: passes over the train split (one epoch = N // branch batch
            steps).
        global_batch_size: images per step over all replicas, both branches
            together (cross pairing: 2 x 128 = 256).
        learning_rate: eta_0 of the hash network, or `auto` (None): by the
            code length, `learning_rate_for_code_length`.
        hash_lr_multiplier: hash-layer lr multiple (GA: 10).
        lr_step_epochs: epochs between lr decays.
        lr_decay: decay factor.
        momentum, nesterov, weight_decay: eq. (18), L2 coupled.
        optimizer: `sgd`, the Nesterov SGD of eq. (18), or `adam` (beyond
            the paper): Adam with beta_1 = momentum, beta_2 = 0.999 and
            epsilon = 1e-7, the same coupled L2 and lr multipliers. Gradient
            attention's look-ahead differentiates eq. (18), so `adam` needs
            `attention=false`.
        paired_views: every image of a step comes twice, so it meets a
            second view of itself (with `image_augmentation`, two augmented
            views) besides the other images of the batch (beyond the paper).
            Cross pairing: both branches hold the same train images. Within
            pairing: the batch holds half as many images, each twice, and
            every pair of its codes enters the loss.
        strategy: `default`, `mirrored` or `multi_worker`.
        checkpoint_every_steps: steps between checkpoints.
        keep_checkpoints: checkpoints kept on disk.
        eval_every_epochs: epochs between validation MAP evaluations.
        deterministic: turn on TF op determinism (exact resume).
        seed: the one seed of the run.
    """

    epochs: int = 50
    global_batch_size: int = 256
    learning_rate: typing.Optional[float] = dataclasses.field(
        default=5e-4, metadata={"flag": (str, "0.0005")}
    )
    hash_lr_multiplier: float = 10.0
    lr_step_epochs: int = 30
    lr_decay: float = 0.5
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    paired_views: bool = False
    strategy: str = "default"
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    eval_every_epochs: int = 5
    deterministic: bool = True
    seed: int = 0

    def __post_init__(self):
        _canonicalize(self)
        _positive("epochs", self.epochs)
        _at_least("global_batch_size", self.global_batch_size, 2)
        _positive("hash_lr_multiplier", self.hash_lr_multiplier)
        _positive("lr_step_epochs", self.lr_step_epochs)
        _positive("lr_decay", self.lr_decay)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(
                f"momentum must be in [0, 1); received momentum={self.momentum}"
            )
        _positive("weight_decay", self.weight_decay, True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("strategy", self.strategy, STRATEGIES)
        _positive("checkpoint_every_steps", self.checkpoint_every_steps)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("eval_every_epochs", self.eval_every_epochs)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Retrieval metrics, protocol.md §3.

    Attributes:
        top_k: MAP cut-off; 0 means MAP@ALL.
        ap_denominator: `retrieved`, `min_rk` or `all`.
        empty_query: `zero` or `skip`.
        hamming_radius: radius of the precision/recall point.
    """

    top_k: int = 0
    ap_denominator: str = "retrieved"
    empty_query: str = "zero"
    hamming_radius: int = 2

    def __post_init__(self):
        _positive("top_k", self.top_k, allow_zero=True)
        check_choice("ap_denominator", self.ap_denominator, AP_DENOMINATORS)
        check_choice("empty_query", self.empty_query, EMPTY_QUERY)
        _positive("hamming_radius", self.hamming_radius, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs.

    Attributes:
        workdir: run directory (config.json, checkpoints, hasher.keras).
        logdir: TensorBoard directory; empty = <workdir>/logs.
        progress: show progress bars.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    loss: LossConfig = LossConfig()
    attention: AttentionConfig = AttentionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    workdir: str = "workdir"
    logdir: str = ""
    progress: bool = True

    def __post_init__(self):
        # Every float flag must be finite (`nan <= 0` is False, so range
        # checks alone let NaN through).
        for section in _SECTIONS:
            values = getattr(self, section)
            for field in dataclasses.fields(values):
                _finite(field.name, getattr(values, field.name))
        if not self.workdir:
            raise ValueError("workdir must be a path; received ''")
        if self.train.learning_rate is None:
            object.__setattr__(self, "train", dataclasses.replace(
                self.train, learning_rate=learning_rate_for_code_length(
                    self.model.code_length)))
        if self.similarity.similarity_centring is None:
            object.__setattr__(self, "similarity", dataclasses.replace(
                self.similarity,
                similarity_centring=centring_for_code_length(
                    self.model.code_length)))
        if self.train.optimizer == "adam" and self.attention.attention:
            raise ValueError(
                "optimizer='adam' needs attention=false: gradient "
                "attention's look-ahead differentiates the SGD step of eq. "
                "(18); received optimizer='adam', attention=True"
            )
        if self.similarity.similarity_stock_features and (
                self.model.backbone_weights == "default"
                or self.model.trainable_backbone
                or self.data.dataset == "features"):
            raise ValueError(
                "similarity_stock_features=true joins the stock backbone's "
                "features to a fine-tuned backbone's in S's graph, so it "
                "needs a frozen run (trainable_backbone=false) on an image "
                "dataset with backbone_weights set to the fine-tuned "
                f"backbone; received backbone_weights="
                f"{self.model.backbone_weights!r}, trainable_backbone="
                f"{self.model.trainable_backbone}, dataset="
                f"{self.data.dataset!r}")
        per_branch = self.train.global_batch_size
        if self.loss.pairing == "cross" or self.train.paired_views:
            if per_branch % 2:
                raise ValueError(
                    "global_batch_size must be even with pairing=cross "
                    "(two branches) or paired_views (two views of each "
                    f"image); received global_batch_size={per_branch}"
                )

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "similarity": SimilarityConfig,
    "loss": LossConfig,
    "attention": AttentionConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
_TOP_LEVEL = ("workdir", "logdir", "progress")


def flag_specs():
    """Yield (name, default, type, doc) for every config field, flat.

    An Optional[float] field is a float flag without a default; a field
    with metadata `flag=(type, default)` is a flag of that type (the config
    reads its text through `canonical_value`).
    """
    for section, cls in _SECTIONS.items():
        docs = _attribute_docs(cls)
        for field in dataclasses.fields(cls):
            kind, default = field.metadata.get(
                "flag", (_flag_type(field.type), field.default)
            )
            yield field.name, default, kind, docs.get(field.name, section)
    docs = _attribute_docs(ExperimentConfig)
    for field in dataclasses.fields(ExperimentConfig):
        if field.name in _TOP_LEVEL:
            yield field.name, field.default, field.type, docs.get(
                field.name, ""
            )


def _flag_type(annotation):
    """float for Optional[float]; the annotation itself otherwise."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def experiment_from_flat(values):
    """Build an ExperimentConfig from a flat {field_name: value} mapping.

    Unknown names raise ValueError, so a typo never passes silently.
    """
    values = dict(values)
    sections = {}
    for section, cls in _SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        sections[section] = cls(
            **{n: values.pop(n) for n in names if n in values}
        )
    top = {n: values.pop(n) for n in _TOP_LEVEL if n in values}
    if values:
        raise ValueError(
            f"unknown config fields: {', '.join(sorted(values))}"
        )
    return ExperimentConfig(**sections, **top)


def with_values(experiment, values):
    """`experiment` with the flat {field_name: value} `values` replaced."""
    flat = {}
    for name, value in experiment.to_dict().items():
        flat.update(value if isinstance(value, dict) else {name: value})
    flat.update(values)
    return experiment_from_flat(flat)


def experiment_from_dict(nested):
    """Inverse of `ExperimentConfig.to_dict` (reads config.json)."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return experiment_from_flat(flat)


# Fields that say where a run reads and writes and how it reports, never
# what it computes. Stored results (table cells, sweep cells) are keyed
# with them at their defaults, so the same experiment run from another
# folder reads them back:
# - workdir: the run's folder (checkpoints, config.json, hasher.keras);
# - logdir: TensorBoard events only;
# - progress: progress bars only (tqdm, the Keras verbosity);
# - data_dir: where the images are read from; which files were read is
#   recorded beside the key (`RetrievalSets.description` names the resolved
#   source, e.g. zip:/.../cifar10-jpeg.zip);
# - cache_dir: where split index files and cached features live; splits
#   are drawn from the seed and features keyed by backbone, split and
#   preprocessing, so every cache folder holds the same arrays.
# Not here, although they look like bookkeeping: checkpoint_every_steps and
# keep_checkpoints (a resumed run restarts from the checkpoint kept, and
# without op determinism its numbers depend on where), eval_every_epochs
# (the validation history is part of a result), strategy and deterministic
# (the arithmetic), data_source and skip_corrupt (which images are read).
LOCATION_FIELDS = {
    "data": ("data_dir", "cache_dir"),
    "": ("workdir", "logdir", "progress"),
}


# Fields added after stored results began to record the digest of their
# experiment. At its default each one does what the code did before it
# existed, so `digest_dict` leaves it out there and those results keep
# their digests; any other value is digested like every field.
ADDED_FIELDS = {"data": ("folder_labels",),
                "model": ("feature_runtime", "image_augmentation"),
                "similarity": ("similarity_learned_share",
                               "similarity_stock_features"),
                "train": ("optimizer", "paired_views")}


def digest_dict(experiment):
    """`experiment.to_dict()` without `ADDED_FIELDS` at their defaults."""
    values = experiment.to_dict()
    for section, names in ADDED_FIELDS.items():
        cls = _SECTIONS[section]
        for name in names:
            if values[section][name] == getattr(cls, name):
                del values[section][name]
    return values


def at_default_locations(experiment):
    """`experiment` with every `LOCATION_FIELDS` field at its default."""
    data = dataclasses.replace(experiment.data, **{
        name: getattr(DataConfig, name) for name in LOCATION_FIELDS["data"]
    })
    return dataclasses.replace(experiment, data=data, **{
        name: getattr(ExperimentConfig, name) for name in LOCATION_FIELDS[""]
    })


def load_experiment(workdir, required=()):
    """Read `<workdir>/config.json` written by a training run.

    Args:
        required: dotted keys (`"model.code_length"`) the file itself must
            hold; a missing one would otherwise read as its default, which
            is wrong for what a run has learned (its code length, its
            backbone).

    Raises:
        FileNotFoundError: no config.json in workdir.
        ValueError: a corrupt file, an invalid field, or the first
            `required` key the file lacks.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {workdir}")
    nested = read_json(path)
    for key in required:
        node = nested
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path} lacks the key {key!r}")
            node = node[part]
    return experiment_from_dict(nested)


def check_writable_dir(path, flag):
    """Refuse a folder path that is a file, lies under a file or is read-only.

    The folder need not exist; its nearest existing ancestor must be a
    writable folder.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is" if probe == os.path.abspath(path) else "lies under"
        raise ValueError(
            f"{flag} {where} a file ({probe}): expected a folder "
            f"(received {flag}={path!r})"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} is not writable ({probe}): expected a folder this user "
            f"may write (received {flag}={path!r})"
        )


def read_json(path):
    """Read a JSON object; a corrupt file is a ValueError naming file/line."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"corrupt JSON ({path}, line {e.lineno} column {e.colno}): "
            f"{e.msg}; expected the file as uhga_tf wrote it (delete it to "
            "start over)"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corrupt JSON ({path}): not UTF-8 text; expected the file as "
            "uhga_tf wrote it (delete it to start over)"
        ) from e
    if not isinstance(value, dict):
        raise ValueError(
            f"corrupt JSON ({path}, line 1): holds a "
            f"{type(value).__name__}; expected an object"
        )
    return value


def _attribute_docs(cls):
    """Parse `name: text` lines of a class docstring's Attributes section."""
    docs, current = {}, None
    in_attrs = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs or not stripped:
            continue
        head, sep, text = stripped.partition(": ")
        names = [n.strip() for n in head.split(",")]
        if sep and all(n.isidentifier() for n in names):
            for name in names:
                docs[name] = text
            current = names
        elif current:
            for name in current:
                docs[name] += " " + stripped
    return docs
