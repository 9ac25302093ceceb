"""Typed run configuration: YAML -> validated dataclasses, with ``--set`` overrides.

A hospital's config may only *name* registered things (datasets, losses, strategies);
nothing in a YAML file is executed. Every field is validated once, at load time, so a
typo or an out-of-range value fails before any data is read or any model is built, with
an error that names the file and the field (and the nearest valid key for typos).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the images come from and how they are decoded (once) and cached."""

    kind: Literal["synthetic", "ham10000", "isic2019_lt", "imagefolder", "medmnist"] = "synthetic"
    root: str | None = None
    """Image folder (ham10000, isic2019_lt, imagefolder) or directory holding ``npz_file``."""
    metadata_csv: str | None = None
    """HAM10000 metadata CSV; defaults to ``<root>/../HAM10000_metadata.csv`` or ``<root>/HAM10000_metadata.csv``."""
    train_csv: str | None = None
    val_csv: str | None = None
    test_csv: str | None = None
    npz_file: str | None = None
    split_file: str | None = None
    """Optional CSV (columns ``image_id,split``) that fixes train/val/test exactly."""
    image_size: int = 64
    """Decoded images are resized once to this square size and cached as uint8."""
    cache_dir: str | None = None
    """Where decoded uint8 arrays are cached (keyed by file list and size); ``None`` = ``~/.cache/fopro-kd``."""
    max_unreadable_fraction: float = 0.0
    """Fail when more than this fraction of images cannot be decoded (their names are reported)."""
    # synthetic generator
    num_classes: int = 8
    imbalance_factor: float = 100.0
    max_per_class: int = 500
    synthetic_seed: int = 0
    site_style: str | None = None
    """Synthetic "scanner" style name (see ``fopro_kd.data.synthetic.SCANNER_STYLES``)."""
    class_names: list[str] | None = None
    """Human names of the classes in label-index order (index i is ``class_names[i]``), for data whose files
    carry only indices (MedMNIST ``.npz``, ImageFolder folders ``0``, ``1``...); used in every table, plot and
    report. Must list exactly one unique name per class (checked when the data is loaded)."""


@dataclass
class SplitConfig:
    """Train/val/test protocol: group-aware and balanced held-out sets, as in the FoPro-KD paper."""

    mode: Literal["balanced", "stratified", "predefined", "kfold"] = "balanced"
    """``balanced``: fixed count per class in val/test; ``stratified``: fractions; ``predefined``: from CSVs / split file;
    ``kfold``: group-aware stratified k-fold, fold ``split.fold`` is the test set (see ``folds``)."""
    val_per_class: int = 20
    test_per_class: int = 50
    max_holdout_fraction: float = 0.5
    """Never hold out more than this fraction of a class's groups (protects rare classes' training data)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_imbalance_factor: float | None = None
    """Long-tail subsampling of the training split (n_i = n_max * IF^(-i/(C-1))); ``None`` keeps it as is."""
    seed: int = 0
    folds: int = 5
    """``mode: kfold``: number of folds (>= 2); whole groups (lesions) per fold, stratified by class. Fold
    assignment and the validation draw depend on ``split.seed`` only, never on the run seed, so every method
    and seed of a comparison is tested on the same images."""
    fold: int = 0
    """``mode: kfold``: the fold used as test set (0 .. folds-1); val = ``val_per_class`` per class (capped by
    ``max_holdout_fraction``) drawn by whole groups from the other folds, the rest is train."""


@dataclass
class AugmentConfig:
    """The paper's skin augmentation set, applied on uint8->float tensors in batches."""

    enabled: bool = True
    affine_scale: tuple[float, float] = (0.95, 1.2)
    affine_translate: float = 0.05
    rotation_degrees: float = 45.0
    color_jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.01)
    hflip: bool = True
    vflip: bool = True
    teacher_view: Literal["augmented", "flips", "clean", "student"] = "augmented"
    """What the teacher sees of each training image: ``augmented``, the student's augmented view
    (before the student's resize); ``flips``, the clean image with the student's flips only (one of
    four views, so its features can be cached: exact when flips are the only augmentation);
    ``clean``, the un-augmented image (one view); ``student``, exactly the student's input (its augmented
    view at ``student.input_size``), which the teacher resizes to its own input size: the teacher sees no
    detail the student cannot see (cacheable when flips are the only augmentation)."""


@dataclass
class StudentConfig:
    arch: str = "resnet18"
    init: Literal["random", "imagenet", "teacher"] = "random"
    """``random``; ``imagenet``: timm pretrained weights (``weights_file`` or the Hub); ``teacher``: the
    teacher's own public weights (same ``arch`` as ``teacher.arch``), e.g. the demo teacher."""
    weights_file: str | None = None
    """Local ImageNet checkpoint for ``init: imagenet`` (timm layout)."""
    freeze_backbone: bool = False
    """Keep the pretrained backbone fixed (parameters and BatchNorm statistics) and train only the
    heads and projector: far fewer private parameters for DP-SGD (docs/privacy.md §6). Needs a
    pretrained ``init``."""
    input_size: int | None = None
    """Student input size; ``None`` uses ``data.image_size``."""
    projector_hidden: int | None = None
    """Hidden width of the projector MLP; ``None`` = the backbone feature size (as in EKD)."""
    drop_rate: float = 0.0


@dataclass
class TeacherConfig:
    arch: str = "mobilenetv2_100"
    source: Literal["hub", "file", "none", "demo"] = "hub"
    """``hub``: timm pretrained weights; ``file``: local checkpoint; ``demo``: the built-in synthetic teacher; ``none``: random (tests only)."""
    file: str | None = None
    input_size: int | None = None
    """Teacher input size; ``None`` uses the size from the teacher's pretrained config."""
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    """Override of the teacher's own normalisation (e.g. (0.5,0.5,0.5) for Keras-origin weights)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` keyword arguments (e.g. ``pad_type: same``); plain values only."""
    hub_timeout_s: float = 10.0


@dataclass
class PromptConfig:
    """Fourier Prompt Generator (method.md §2.2)."""

    param: Literal["free", "generator", "radial"] = "free"
    """``free``: one m per channel and frequency; ``generator``: m from a conv net on the image's log-amplitude;
    ``radial``: ``radial_bands`` rings x channels, M interpolated linearly in |k| (fopro_kd/prompt.py)."""
    eps: float = 0.5
    band: float = 1.0
    fft: Literal["rfft2", "fft2"] = "rfft2"
    domain: Literal["raw", "normalised"] = "raw"
    gamma: float = 0.1
    """γ of R = γ·Σ_c Σ_k w_k (M_c(k) − 1)², w normalised over the band: a uniform deviation δ costs γ·C·δ²
    whatever the image size (docs/method-notes.md, FPG)."""
    scope: Literal["local", "federated"] = "local"
    """``local``: the prompt is trained on the site's data and never leaves it. ``federated`` (with
    ``schedule: two_stage``): the server averages the sites' prompts during exploration, then every site
    freezes the same prompt (fopro_kd/federated_prompt.py; what leaves a hospital: docs/privacy.md)."""
    generator_hidden: int = 16
    radial_bands: int = 8
    """``param: radial``: number K >= 2 of equal radial rings on [0, band·Nyquist] (at most the number of
    distinct radial frequencies inside the band)."""
    init: Literal["identity", "probe"] = "identity"
    """``identity`` (m = 0); ``probe`` (``param: radial`` only): rings start from ``probe_file``, M_j =
    1 + eps·tanh(probe_scale·d_j), d_j the band-pass accuracy deviation of the probe (fopro_kd/prompt.py)."""
    probe_file: str | None = None
    """``init: probe``: the frequency_preference.json written by ``fopro-kd probe``."""
    probe_scale: float = 0.75
    """``init: probe``: the best / worst probe band starts at M = 1 ± eps·tanh(probe_scale)."""
    lr: float = 1e-3
    """Learning rate of the prompt's parameters (the prompt optimizer's)."""
    schedule: Literal["joint", "two_stage"] = "joint"
    """``joint``: the prompt trains beside the student for the whole run (online teacher every step).
    ``two_stage``: the prompt trains (with the student, online) for the first ``explore_epochs`` epochs
    only, is then frozen, and T(FPG(x)) is computed once per image and teacher view and reused, so the
    remaining epochs cost about a BSM epoch (README, "Teacher feature cache")."""
    explore_epochs: int = 1
    """Epochs (federated: local epochs counted over rounds) of the exploration stage of ``two_stage``."""


def _default_probe_bands() -> list[tuple[float, float]]:
    return [(i / 8, (i + 1) / 8) for i in range(8)]


@dataclass
class ProbeConfig:
    """Frequency-preference probe (``fopro-kd probe``, fopro_kd/probe.py)."""

    bands: list[tuple[float, float]] = field(default_factory=_default_probe_bands)
    """Radial bands [lo, hi] as fractions of Nyquist, within [0, 1] and not overlapping (hi = 1 includes the
    spectrum's corners); each gives a band-pass, a low-pass [0, hi] and a high-pass [lo, 1] measurement."""
    holdout_fraction: float = 0.3
    """Fraction of each class of the training split (by whole groups when groups exist) held out to score
    the teacher's nearest-class-mean classifier fitted on the rest."""
    max_images: int | None = None
    """Subsample the training split to at most this many images (class-balanced water-filling); ``None``: all."""
    batch_size: int = 64


@dataclass
class AKDConfig:
    """How the prompt is trained (method.md §4). ``off`` keeps the prompt fixed."""

    mode: Literal["off", "minmax", "discriminative", "prototype", "bn_stats"] = "discriminative"
    """The prompt's objective (fopro_kd/prompt_objectives.py, formulas in docs/method-notes.md)."""
    support_per_class: int = 16
    """``prototype``: images per class in the held-out support fold (whole groups, at most half a class's groups)."""
    support_per_step: int = 4
    """``prototype``: support images per class drawn at each prompt step to form the prototypes."""
    temperature: float = 0.1
    """``prototype``: τ of the cosine logits cos(f, p_c) / τ."""
    k_g: int = 1
    k_s: int = 1
    warmup_epochs: int = 0
    # Train the prompt on every k-th batch only; the other batches take one no-grad prompted
    # teacher forward. The prompt step pays a teacher backward (1.8x its forward for
    # MobileNetV2), so k = 3-4 brings the FPG cost at 224 px from ~+40% to ~+10-15%.
    prompt_every: int = 1
    student_input: Literal["own", "prompted"] = "own"
    """What the student is trained on: ``own`` (its augmented view) or ``prompted``, the teacher's prompted input
    x̃ = FPG(v(x)) resized to the student's size, so that both networks see the same x̃ (adversarial KD; with
    ``minmax`` the student learns on the inputs the prompt made hard). With ``prompted`` the student's augmentation is
    the teacher's view (``augment.teacher_view: augmented`` keeps it). ``train.method: fopro-kd``, ``prompt.domain:
    raw``, no DP (docs/method-notes.md)."""


@dataclass
class TrainConfig:
    method: Literal["ce", "bsm", "ekd", "fopro-kd"] = "fopro-kd"
    loss: Literal["ce", "bsm", "logit_adjust", "ldam", "focal"] = "bsm"
    """Classification loss on both heads (``ce`` method forces ``ce``)."""
    epochs: int = 8
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    lambda_rep: float = 3.0
    rep_weighting: Literal["none", "class_balanced"] = "none"
    """Per-class weight of ℓ_rep: ``none`` (EKD as published) or ``class_balanced`` (effective-number
    weights of the training counts, summing to the number of classes; method.md §3.4)."""
    rep_weighting_beta: float = 0.9999
    """``rep_weighting: class_balanced``: β of the effective number (0 = uniform, → 1 = inverse frequency)."""
    rep_weighting_start: float = 0.8
    """``rep_weighting: class_balanced``: the weights apply from this fraction of the epochs (federated:
    of the rounds) on; 0 = from the start. Fed-MAS switches them on after 80%."""
    grad_clip: float = 5.0
    focal_gamma: float = 2.0
    logit_adjust_tau: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start_fraction: float = 0.8
    cache_teacher_features: bool = False
    """Compute the teacher's (prompted, frozen) features once per image and teacher view and reuse
    them; needs ``augment.teacher_view`` ``flips`` or ``clean`` and, for ``fopro-kd``, a frozen prompt
    (``prompt.schedule: two_stage``)."""
    cache_dtype: Literal["float32", "float16"] = "float32"
    """Storage of cached teacher features (float16 halves the memory; targets are cast back to float32)."""
    max_cache_gb: float = 4.0
    """Refuse a teacher feature cache larger than this (images x views x feature dim x bytes)."""
    save_resume_state: bool = True
    """Single site: after every epoch but the last, ``resume_state.pt`` in the run directory (the student, the
    trainer's state, the selection so far; ≈ 3× the student's size), so that ``fopro-kd train --resume`` continues a
    stopped run with the result it would have had; removed when the run finishes (fopro_kd/training/resume.py). Not
    with local DP (a stopped epoch's noise draws would go uncharged)."""
    feature_cache_dir: str | None = None
    """Also keep cached teacher features on disk here, per image (``null``: memory only): one store per teacher,
    prompt and view setting, keyed by each image's content digest, so a later run (another seed, another fold of
    the same data) runs the teacher only on images the store lacks. The files are features of the site's images:
    keep them on the site's own storage, like the data."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; ``None`` leaves torch's default."""


@dataclass
class MetricsConfig:
    many_shot_threshold: int = 100
    few_shot_threshold: int = 20
    tail_classes: int | None = None
    """Size k of the ``tail`` group: the k rarest training classes (ties: lower label index first), reported
    next to many/medium/few-shot so that a rare-class headline exists even when no class has fewer than
    ``few_shot_threshold`` training images (HAM10000). ``null``: k = min(3, C - 1) for C <= 10 classes,
    ceil(C / 4) (the rarest quarter) for more."""


@dataclass
class PartitionConfig:
    """How one dataset is split into virtual hospitals (simulation only)."""

    kind: Literal["dirichlet", "quantity", "imbalance", "site_column", "iid"] = "dirichlet"
    alpha: float = 0.5
    quantity_sigma: float = 1.0
    site_imbalance_factors: list[float] = field(default_factory=list)
    site_styles: list[str] = field(default_factory=list)
    min_per_site: int = 10
    local_test_fraction: float = 0.2


@dataclass
class FederationConfig:
    num_rounds: int = 5
    num_clients: int = 4
    strategy: Literal["fedavg", "fedprox", "fedmas", "class_balanced", "median", "trimmed_mean"] = "fedavg"
    fedmas_rule: Literal["mas", "mas_inv", "mas_DRW"] = "mas"
    drw_fraction: float = 0.8
    drw_beta: float = 0.9999
    cb_beta: float = 0.999
    fedprox_mu: float = 0.45
    local_epochs: int = 1
    local_steps: int | None = None
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_clients: int = 2
    round_timeout_s: float = 3600.0
    """Seconds the server waits for the replies of one round; a node that has not replied by then counts as failed."""
    min_valid_replies: int = 1
    """Fewest valid train replies needed to aggregate a round; below it the previous global model is kept."""
    max_failed_rounds: int = 3
    """Stop (non-zero exit, state saved) after this many consecutive rounds with too few valid replies."""
    max_update_norm: float | None = None
    """Reject a reply whose update ||theta_k - theta|| (floating arrays, L2) exceeds this absolute bound; ``None``:
    the relative bound ``update_norm_factor`` applies (docs/reliability.md §robust aggregation)."""
    update_norm_factor: float | None = 1.0
    """Default update bound, relative to the global model: reject ||theta_k - theta|| > kappa * ||theta|| with
    kappa = this factor (floating arrays, L2). Honest local updates measured 0.02-0.3 ||theta||; a site that scales or
    sign-flips its weights sends >= 2 ||theta||. ``None``: no relative bound. Ignored when ``max_update_norm`` is set."""
    max_num_examples: int | None = None
    """Absolute cap on the ``num-examples`` a site may report (its FedAvg weight); larger replies are rejected."""
    num_examples_growth: float = 2.0
    """A site's ``num-examples`` may not exceed this factor times the first value the server accepted from it."""
    num_examples_peer_ratio: float = 100.0
    """A reply's ``num-examples`` may not exceed this factor times the median of the other replies of the round."""
    trim_fraction: float = 0.2
    """``strategy: trimmed_mean``: fraction beta of the replies dropped at *each* end per coordinate (floor(beta n))."""
    robust_min_cosine: float | None = 0.0
    """``strategy: median`` / ``trimmed_mean``: reject a reply whose update has cosine similarity below this with the
    coordinate-wise median update (a sign-flipped update has about -1); needs >= 3 replies. ``None``: no check."""
    node_wait_s: float = 600.0
    """Longest time the server waits for ``min_available_clients`` nodes to be connected (at the start or after a
    node died); past it the run ends cleanly (``aborted.json``, last checkpoint kept, resumable)."""
    share_class_counts: bool | None = None
    """Send per-class counts to the server; ``None`` = only when the strategy needs them."""
    transfer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the floating weights on the wire, both ways; the server keeps float32 master weights.
    float16/bfloat16 halve every message (and what the server holds per hospital); integer buffers stay exact."""
    client_num_cpus: float = 1.0
    client_num_threads: int = 1
    client_num_gpus: float | None = None
    """Simulation: GPU share of one virtual hospital (Ray ``num_gpus``; 0.25 = four hospitals per GPU, each actor
    loading the teacher once). ``None``: 1/num_clients (at most 1) when ``device`` is cuda/auto and a GPU is
    visible, else 0."""
    evaluate_every: int = 1
    """Server validation and federated evaluation every k rounds (and always in the last round); the rounds in
    between get a history row with the clients' figures and no scores (docs/performance.md)."""
    test_every_round: bool = True
    """Score the server's test split whenever validation runs (per-round test curves); ``false``: only the model
    selected on validation is tested, once, at the end."""
    evaluate_in_train: bool = True
    """Federated evaluation of a scheduled round r before the last is done by the sites in round r + 1's train call:
    each scores the global model it received (round r's) on its local test split before training and sends the
    counts with its update, saving a round trip of the whole model to every site. The scoring sites are then round
    r + 1's train sample; the last round keeps its evaluate phase. ``false``: an evaluate phase after every scheduled
    round (the behaviour before). Off in DP mode like all federated evaluation (``fopro_kd/round_schedule.py``)."""
    state_persist_every: int = 1
    """Simulation: each site's state (optimizer, prompt, RNG) stays in the engine's memory (``context.state``) and
    is written to disk, with the server's checkpoint, every k rounds and in the last; a killed run resumes from the
    last persisted round and repeats at most k - 1 rounds. 1: written and read back every round, nothing kept in
    memory (a hospital costs the simulation what it costs in deployment). Deployment (SuperNodes) always persists
    every round.
    Must be 1 with ``privacy.mode`` local/central (a repeated round would be charged twice or not at all)."""
    state_memory: Literal["auto", "node", "context"] = "auto"
    """Simulation, between persists: where each site's kept state lives. ``node``: a file in this machine's shared
    memory (``/dev/shm``, or ``$FOPRO_KD_LIVE_STATE``), only a one-use token in ``context.state``; ``context``: the
    serialised state in ``context.state``, which Ray carries to the actor and back with every message (the behaviour
    before; needed on a Ray cluster, where another machine may serve the site). ``auto``: ``context`` with
    ``ray_address``, else ``node`` (client/state.py)."""
    reuse_client_models: bool = True
    """Simulation actors keep one student module per architecture and load each round's global weights into it
    (client/model_cache.py); ``false`` builds them for every message (the behaviour before; for benchmarks)."""
    ray_address: str | None = None
    """Simulation on a Ray cluster: the address of a running head (``ray start --head``), e.g. ``"auto"`` or
    ``"10.0.0.5:6379"``; ``None`` starts a private Ray instance on this machine (docs/performance.md)."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass
class PrivacyConfig:
    """Differential privacy (docs/privacy.md). ``off`` trains exactly as without this section.

    ``local``: sample-level DP-SGD (Opacus) for every hospital's student, with a budget
    (``target_epsilon``, ``delta``) per hospital for the whole federation. ``central``:
    user-level DP at the server (clip each client's update, add calibrated Gaussian noise).
    """

    mode: Literal["off", "local", "central"] = "off"
    target_epsilon: float | None = None
    """Budget ε per hospital for the whole federation (not per round); ``None`` = no budget, report ε only."""
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    """Per-sample L2 clipping bound C of DP-SGD (replaces ``train.grad_clip`` in ``local`` mode)."""
    noise_multiplier: float | None = None
    """σ of DP-SGD; ``None`` = derived from ``target_epsilon`` over the planned rounds and steps."""
    accountant: Literal["rdp", "prv"] = "rdp"
    prompt: Literal["frozen", "dp"] = "frozen"
    """``frozen``: identity Fourier prompt, never updated on private data; ``dp``: prompt (and probe) trained by DP-SGD."""
    statistics: Literal["noised", "withheld"] = "noised"
    """Per-class statistics that leave the hospital (class counts, FedMAS priors): Gaussian-noised and accounted, or not sent."""
    statistics_noise_multiplier: float = 10.0
    """σ of the Gaussian mechanism on statistics (one release at σ = 1 alone costs ε ≈ 4.7 at δ = 1e-5)."""
    central_clip_norm: float = 1.0
    central_noise_multiplier: float = 1.0
    planned_rounds: int | None = None
    """Rounds the budget must last; ``None`` = ``federation.num_rounds``."""
    noise_seed: int | None = None
    """``None`` (required for a real guarantee): noise and Poisson sampling use a secret OS seed. An integer makes DP runs reproducible for tests only and voids the guarantee."""
    # --- the DP training recipe (issue 11 §3, docs/privacy.md §6.3): large Poisson batches, documented lr rule
    max_physical_batch_size: int | None = None
    """Memory bound of DP-SGD: each Poisson batch (expected size ``train.batch_size``) is processed in chunks of at most this many examples whose clipped per-sample gradients are summed and noised once (one logical step, one accountant event). ``None``: no split."""
    lr_rule: Literal["fixed", "linear"] = "fixed"
    """DP learning rate: ``fixed`` = ``train.lr``; ``linear`` = ``train.lr × train.batch_size / lr_reference_batch`` (applied in ``local`` mode and by the frozen-feature probe)."""
    lr_reference_batch: int = 256
    """Batch at which ``train.lr`` is meant under ``lr_rule: linear``."""
    feature_norm: Literal["none", "l2"] = "l2"
    """Frozen-feature probe only (fopro_kd/privacy/feature_probe.py): ``l2`` divides every backbone feature by its own norm (a per-example, data-independent map: no private statistic), which also bounds every per-sample gradient of the linear head."""


@dataclass
class Config:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    akd: AKDConfig = field(default_factory=AKDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --------------------------------------------------------------------------- range checks

_POSITIVE = {
    "data.image_size", "data.num_classes", "data.max_per_class", "train.epochs", "train.batch_size",
    "train.eval_batch_size", "train.lr", "prompt.eps", "prompt.band", "prompt.lr", "prompt.generator_hidden",
    "federation.num_rounds", "federation.num_clients", "federation.local_epochs", "federation.round_timeout_s",
    "akd.k_g", "akd.k_s", "akd.prompt_every", "akd.support_per_class", "akd.support_per_step", "akd.temperature", "teacher.hub_timeout_s", "federation.client_num_cpus", "federation.client_num_threads",
    "federation.min_available_clients", "federation.evaluate_every", "federation.state_persist_every",
}
_NON_NEGATIVE = {
    "split.val_per_class", "split.test_per_class", "train.weight_decay", "train.lambda_rep", "train.grad_clip",
    "prompt.gamma", "akd.warmup_epochs", "federation.fedprox_mu", "data.max_unreadable_fraction",
    "metrics.many_shot_threshold", "metrics.few_shot_threshold", "train.focal_gamma", "seed",
}
_UNIT_INTERVAL = {  # (0, 1]
    "prompt.eps", "prompt.band", "federation.fraction_train", "split.max_holdout_fraction", "federation.drw_fraction",
}
_FRACTION = {  # [0, 1)
    "split.val_fraction", "split.test_fraction", "federation.partition.local_test_fraction", "federation.drw_beta",
    "federation.cb_beta", "data.max_unreadable_fraction",
}


def _check_ranges(cfg: Config, source: str) -> None:
    def get(path: str) -> Any:
        obj: Any = cfg
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    for path in _POSITIVE:
        if get(path) is not None and get(path) <= 0:
            raise ConfigError(f"{source}: '{path}' must be > 0, got {get(path)!r}")
    for path in _NON_NEGATIVE:
        if get(path) is not None and get(path) < 0:
            raise ConfigError(f"{source}: '{path}' must be >= 0, got {get(path)!r}")
    for path in _UNIT_INTERVAL:
        if not 0 < get(path) <= 1:
            raise ConfigError(f"{source}: '{path}' must be in (0, 1], got {get(path)!r}")
    for path in _FRACTION:
        if not 0 <= get(path) < 1:
            raise ConfigError(f"{source}: '{path}' must be in [0, 1), got {get(path)!r}")
    for path in ("data.imbalance_factor", "split.train_imbalance_factor"):
        value = get(path)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: '{path}' is an imbalance factor (n_max / n_min) and must be >= 1, got {value!r}")
    _check_display(cfg, source)
    if cfg.data.num_classes < 2:
        raise ConfigError(f"{source}: 'data.num_classes' must be >= 2, got {cfg.data.num_classes}")
    if not 16 <= cfg.data.image_size <= 1024:
        raise ConfigError(f"{source}: 'data.image_size' must be in [16, 1024], got {cfg.data.image_size}")
    if cfg.split.val_fraction + cfg.split.test_fraction >= 1:
        raise ConfigError(f"{source}: 'split.val_fraction' + 'split.test_fraction' must be < 1")
    if cfg.split.folds < 2:
        raise ConfigError(f"{source}: 'split.folds' must be >= 2 (k-fold cross-validation), got {cfg.split.folds}")
    if not 0 <= cfg.split.fold < cfg.split.folds:
        raise ConfigError(
            f"{source}: 'split.fold' must be in 0..{cfg.split.folds - 1} (split.folds={cfg.split.folds}), "
            f"got {cfg.split.fold}"
        )
    if cfg.split.mode == "kfold" and cfg.data.split_file:
        raise ConfigError(
            f"{source}: 'split.mode' is 'kfold' but 'data.split_file' is set; a split file fixes the split, "
            f"remove one of them"
        )
    if cfg.teacher.source == "file" and not cfg.teacher.file and cfg.train.method in ("ekd", "fopro-kd"):
        raise ConfigError(f"{source}: 'teacher.source' is 'file' but 'teacher.file' is not set")
    _check_reliability(cfg, source)
    _check_metric_thresholds(cfg, source)
    if cfg.federation.min_available_clients > cfg.federation.num_clients:
        raise ConfigError(
            f"{source}: 'federation.min_available_clients' ({cfg.federation.min_available_clients}) exceeds "
            f"'federation.num_clients' ({cfg.federation.num_clients})"
        )
    _check_student_init(cfg, source)
    _check_privacy(cfg, source)
    _check_prompt_and_probe(cfg, source)
    _check_teacher_schedule(cfg, source)
    for value in cfg.teacher.model_kwargs.values():
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise ConfigError(f"{source}: 'teacher.model_kwargs' values must be plain scalars, got {value!r}")


def feature_cache_problem(cfg: Config) -> str | None:
    """Why cached teacher features would be wrong for ``cfg``, or None when they are valid.

    The one home of this rule: the config check (before any data is read) and the trainer
    (defence in depth) both ask it. A cached target is exact when the teacher's input is a
    function of the image and a finite view index only, and the teacher (with its prompt) is
    frozen while the cache is used.
    """
    if cfg.train.method not in ("ekd", "fopro-kd"):
        return f"method {cfg.train.method!r} has no teacher"
    if cfg.train.method == "fopro-kd" and cfg.prompt.schedule != "two_stage":
        return ("the prompt changes the teacher's input every step (method 'fopro-kd' with prompt.schedule "
                "'joint'); set prompt.schedule: two_stage")
    if cfg.augment.enabled and cfg.augment.teacher_view == "augmented":
        return "the teacher sees augmented images; set augment.teacher_view: flips (or clean)"
    if cfg.augment.enabled and cfg.augment.teacher_view == "student" and not augment_is_flips_only(cfg.augment):
        return ("augment.teacher_view 'student' shows the teacher the student's augmented view, which is a finite "
                "set of views only when flips are the only augmentation (affine_scale [1, 1], affine_translate 0, "
                "rotation_degrees 0, color_jitter zeros)")
    return None


def augment_is_flips_only(augment: AugmentConfig) -> bool:
    """True when the augmentation can only flip (every other op is the identity)."""
    return (tuple(augment.affine_scale) == (1.0, 1.0) and augment.affine_translate == 0
            and augment.rotation_degrees == 0 and not any(augment.color_jitter))


def _check_teacher_schedule(cfg: Config, source: str) -> None:
    """``prompt.schedule`` and the teacher feature cache (README, "Teacher feature cache")."""
    if cfg.prompt.explore_epochs < 0:
        raise ConfigError(f"{source}: 'prompt.explore_epochs' must be >= 0, got {cfg.prompt.explore_epochs!r}")
    # prompt.* applies to fopro-kd only; other methods ignore it, so one config serves every method of a
    # comparison (benchmark_methods' bsm / ekd variants of configs/ham10000-lt.yaml)
    if cfg.prompt.schedule == "two_stage" and cfg.train.method == "fopro-kd":
        if cfg.prompt.scope == "local" and cfg.prompt.explore_epochs >= cfg.train.epochs:
            raise ConfigError(
                f"{source}: 'prompt.explore_epochs' ({cfg.prompt.explore_epochs}) must be < 'train.epochs' "
                f"({cfg.train.epochs}): two_stage needs at least one distillation epoch after exploration")
        problem = feature_cache_problem(cfg)
        if problem is not None:
            raise ConfigError(f"{source}: 'prompt.schedule' two_stage caches the prompted teacher's features, but {problem}")
    if cfg.train.cache_teacher_features:
        problem = feature_cache_problem(cfg)
        if problem is not None:
            raise ConfigError(f"{source}: 'train.cache_teacher_features' cannot be used: {problem}")
    if (cfg.privacy.mode == "local" and cfg.privacy.prompt == "dp" and cfg.train.method == "fopro-kd"
            and cfg.akd.mode not in ("off", "discriminative", "minmax")):
        raise ConfigError(
            f"{source}: 'akd.mode' {cfg.akd.mode!r} has no DP-SGD prompt step; with privacy.prompt 'dp' use "
            "'discriminative' or 'minmax', or privacy.prompt 'frozen'")
    if cfg.akd.student_input == "prompted":
        needs = []
        if cfg.train.method != "fopro-kd":
            needs.append(f"train.method 'fopro-kd' (got {cfg.train.method!r}: no prompt)")
        if cfg.prompt.domain != "raw":
            needs.append(f"prompt.domain 'raw' (got {cfg.prompt.domain!r}: x̃ must be an image the student can read)")
        if cfg.privacy.mode != "off":
            needs.append(f"privacy.mode 'off' (got {cfg.privacy.mode!r}: not covered by the DP analysis)")
        if needs:
            raise ConfigError(f"{source}: 'akd.student_input' prompted needs " + "; ".join(needs))
    if not 0.0 <= cfg.train.rep_weighting_beta < 1.0:
        raise ConfigError(f"{source}: 'train.rep_weighting_beta' must be in [0, 1), got {cfg.train.rep_weighting_beta!r}")
    if not 0.0 <= cfg.train.rep_weighting_start <= 1.0:
        raise ConfigError(
            f"{source}: 'train.rep_weighting_start' must be in [0, 1], got {cfg.train.rep_weighting_start!r}")
    if cfg.train.max_cache_gb <= 0:
        raise ConfigError(f"{source}: 'train.max_cache_gb' must be > 0, got {cfg.train.max_cache_gb!r}")


def _check_prompt_and_probe(cfg: Config, source: str) -> None:
    """``prompt.param: radial`` / ``prompt.init: probe`` and the ``probe`` section (fopro_kd/prompt.py, probe.py)."""
    p = cfg.prompt
    if isinstance(p.radial_bands, bool) or p.radial_bands < 2:
        raise ConfigError(f"{source}: 'prompt.radial_bands' must be an integer >= 2, got {p.radial_bands!r}")
    if p.probe_scale < 0:
        raise ConfigError(f"{source}: 'prompt.probe_scale' must be >= 0, got {p.probe_scale!r}")
    if p.init == "probe":
        if p.param != "radial":
            raise ConfigError(f"{source}: 'prompt.init' is 'probe' but 'prompt.param' is {p.param!r}; the probe "
                              "initialises the rings of 'prompt.param: radial'")
        if not p.probe_file:
            raise ConfigError(f"{source}: 'prompt.init' is 'probe' but 'prompt.probe_file' is not set (the "
                              "frequency_preference.json written by `fopro-kd probe`)")
    problem = probe_bands_problem(cfg.probe.bands)
    if problem is not None:
        raise ConfigError(f"{source}: 'probe.bands' {problem}")
    if not 0 < cfg.probe.holdout_fraction < 1:
        raise ConfigError(f"{source}: 'probe.holdout_fraction' must be in (0, 1), got {cfg.probe.holdout_fraction!r}")
    if cfg.probe.max_images is not None and cfg.probe.max_images < 4:
        raise ConfigError(f"{source}: 'probe.max_images' must be >= 4 or null, got {cfg.probe.max_images!r}")
    if cfg.probe.batch_size < 1:
        raise ConfigError(f"{source}: 'probe.batch_size' must be >= 1, got {cfg.probe.batch_size!r}")


def probe_bands_problem(bands: Any) -> str | None:
    """What is wrong with a list of radial bands [lo, hi] (fractions of Nyquist), or None when usable."""
    if not bands:
        return "is empty: list at least one band [lo, hi] within [0, 1]"
    pairs = []
    for i, band in enumerate(bands):
        if not isinstance(band, (list, tuple)) or len(band) != 2:
            return f"entry {i} must be a pair [lo, hi], got {band!r}"
        lo, hi = band
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi)):
            return f"entry {i} must hold two numbers, got {band!r}"
        if not 0.0 <= lo < hi <= 1.0:
            return f"entry {i} {list(band)} must satisfy 0 <= lo < hi <= 1 (fractions of Nyquist)"
        pairs.append((float(lo), float(hi), i))
    pairs.sort()
    for (lo_a, hi_a, i), (lo_b, _hi_b, j) in zip(pairs, pairs[1:]):
        if lo_b < hi_a - 1e-12:
            return f"entries {i} {[lo_a, hi_a]} and {j} overlap; bands must be disjoint"
    return None


def _check_display(cfg: Config, source: str) -> None:
    """``data.class_names`` and ``metrics.tail_classes`` (the count of names is checked against the data in
    :func:`fopro_kd.data.build_splits`, the first moment the number of classes is known)."""
    names = cfg.data.class_names
    if names is not None:
        if len(names) < 2:
            raise ConfigError(f"{source}: 'data.class_names' must list at least 2 names, got {names!r}")
        blank = [i for i, n in enumerate(names) if not n.strip()]
        if blank:
            raise ConfigError(f"{source}: 'data.class_names' entries must be non-empty, got an empty name at {blank}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{source}: 'data.class_names' must be unique, got duplicates {duplicates}")
    k = cfg.metrics.tail_classes
    if k is not None and k < 1:
        raise ConfigError(f"{source}: 'metrics.tail_classes' must be >= 1 or null, got {k!r}")


def _check_reliability(cfg: Config, source: str) -> None:
    """Failure-handling fields of ``federation`` (docs/reliability.md)."""
    fed = cfg.federation
    for name in ("min_valid_replies", "max_failed_rounds"):
        value = getattr(fed, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{source}: 'federation.{name}' must be an integer >= 1, got {value!r}")
    if fed.min_valid_replies > fed.num_clients:
        raise ConfigError(
            f"{source}: 'federation.min_valid_replies' ({fed.min_valid_replies}) exceeds 'federation.num_clients' "
            f"({fed.num_clients}): no round could ever aggregate"
        )
    norm = fed.max_update_norm
    if norm is not None and not (norm > 0 and math.isfinite(norm)):
        raise ConfigError(f"{source}: 'federation.max_update_norm' must be a finite number > 0 or null, got {norm!r}")
    _check_robustness(cfg, source)


def _check_robustness(cfg: Config, source: str) -> None:
    """Robust-aggregation and wait bounds of ``federation`` (docs/reliability.md, issue 14)."""
    fed = cfg.federation

    def number(name: str, value: Any, low: float, *, inclusive: bool = False, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (value >= low if inclusive else value > low))
        if not ok:
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ConfigError(f"{source}: 'federation.{name}' must be a finite number {bound}"
                              f"{' or null' if allow_none else ''}, got {value!r}")

    number("update_norm_factor", fed.update_norm_factor, 0, allow_none=True)
    number("num_examples_growth", fed.num_examples_growth, 1, inclusive=True)
    number("num_examples_peer_ratio", fed.num_examples_peer_ratio, 1, inclusive=True)
    number("node_wait_s", fed.node_wait_s, 0)
    cap = fed.max_num_examples
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"{source}: 'federation.max_num_examples' must be an integer >= 1 or null, got {cap!r}")
    beta = fed.trim_fraction
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
        raise ConfigError(f"{source}: 'federation.trim_fraction' must be in [0, 0.5), got {beta!r}")
    cos = fed.robust_min_cosine
    if cos is not None and (isinstance(cos, bool) or not isinstance(cos, (int, float)) or not -1 <= cos <= 1):
        raise ConfigError(f"{source}: 'federation.robust_min_cosine' must be in [-1, 1] or null, got {cos!r}")


def _check_metric_thresholds(cfg: Config, source: str) -> None:
    """Every ``metrics`` threshold at load time, not after the first epoch (issue 14: few_shot_threshold=500)."""
    m = cfg.metrics
    for name in ("many_shot_threshold", "few_shot_threshold"):
        value = getattr(m, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{source}: 'metrics.{name}' must be an integer >= 0 (training images per class), "
                              f"got {value!r}")
    if m.few_shot_threshold > m.many_shot_threshold:
        raise ConfigError(
            f"{source}: 'metrics.few_shot_threshold' ({m.few_shot_threshold}) must be <= "
            f"'metrics.many_shot_threshold' ({m.many_shot_threshold}): few-shot classes have fewer than "
            f"few_shot_threshold training images, many-shot classes more than many_shot_threshold"
        )
    k = m.tail_classes
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise ConfigError(f"{source}: 'metrics.tail_classes' must be an integer >= 1 or null, got {k!r}")


def _check_student_init(cfg: Config, source: str) -> None:
    s = cfg.student
    if s.freeze_backbone and s.init == "random":
        raise ConfigError(
            f"{source}: 'student.freeze_backbone' is true but 'student.init' is 'random': a frozen random backbone "
            "learns nothing; use 'init: imagenet' or 'init: teacher'"
        )
    if s.init == "teacher" and s.arch != cfg.teacher.arch:
        raise ConfigError(
            f"{source}: 'student.init' is 'teacher' but 'student.arch' ({s.arch!r}) differs from 'teacher.arch' "
            f"({cfg.teacher.arch!r}); the teacher's weights only fit its own architecture"
        )
    if s.init == "teacher" and cfg.teacher.source == "file" and not cfg.teacher.file:
        raise ConfigError(f"{source}: 'student.init' is 'teacher' and 'teacher.source' is 'file' but 'teacher.file' is not set")


def _check_privacy(cfg: Config, source: str) -> None:
    p = cfg.privacy
    for name in ("target_epsilon", "noise_multiplier", "max_grad_norm", "statistics_noise_multiplier",
                 "central_clip_norm", "central_noise_multiplier", "planned_rounds"):
        value = getattr(p, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{source}: 'privacy.{name}' must be > 0, got {value!r}")
    if not 0 < p.delta < 1:
        raise ConfigError(f"{source}: 'privacy.delta' must be in (0, 1), got {p.delta!r}")
    if p.max_physical_batch_size is not None and p.max_physical_batch_size < 1:
        raise ConfigError(f"{source}: 'privacy.max_physical_batch_size' must be >= 1 or null, got {p.max_physical_batch_size!r}")
    if p.lr_reference_batch < 1:
        raise ConfigError(f"{source}: 'privacy.lr_reference_batch' must be >= 1, got {p.lr_reference_batch!r}")
    if p.mode == "local" and p.max_physical_batch_size is not None:
        if p.prompt == "dp" and cfg.train.method == "fopro-kd" and cfg.akd.mode != "off":
            raise ConfigError(f"{source}: 'privacy.max_physical_batch_size' splits only the student's DP-SGD step; with "
                              "privacy.prompt 'dp' leave it null (the DP prompt step needs the whole batch)")
        if cfg.federation.local_steps is not None:
            raise ConfigError(f"{source}: 'privacy.max_physical_batch_size' with 'federation.local_steps': the trainer "
                              "counts physical chunks as steps; use federation.local_epochs")
    if p.mode != "off" and cfg.federation.state_persist_every != 1:
        raise ConfigError(
            f"{source}: 'federation.state_persist_every' is {cfg.federation.state_persist_every} with 'privacy.mode: "
            f"{p.mode}': a resumed run repeats the rounds since the last persist, which a site's privacy ledger refuses "
            "to charge twice (local) or whose released aggregates the server's accountant would forget (central); "
            "set it to 1"
        )
    if cfg.federation.client_num_gpus is not None and not 0 <= cfg.federation.client_num_gpus <= 1:
        raise ConfigError(f"{source}: 'federation.client_num_gpus' must be in [0, 1] (a GPU share per hospital) or "
                          f"null, got {cfg.federation.client_num_gpus!r}")
    if p.mode == "local" and p.target_epsilon is None and p.noise_multiplier is None:
        raise ConfigError(
            f"{source}: 'privacy.mode' is 'local': set 'privacy.target_epsilon' (the noise multiplier is then derived "
            "from the budget) or 'privacy.noise_multiplier'"
        )


# --------------------------------------------------------------------------- conversion


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int->float and list->tuple only."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: '{path}' has wrong type: got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean: `mode: off` means the choice "off"
            spelled = "off" if value is False else "on"
            if spelled in allowed:
                return spelled
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{source}: '{path}' must be one of {list(allowed)}, got {value!r}{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{path}' must be a mapping (section), got {type(value).__name__}")
        return _build(tp, value, path, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{path}' must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: '{path}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{path}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{path}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{path}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: '{path}' has unsupported type {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            extra = f"; did you mean '{(prefix + '.' if prefix else '') + hint[0]}'?" if hint else ""
            raise ConfigError(f"{source}: unknown config key '{path}'{extra}")
        kwargs[key] = _coerce(value, hints[key], path, source)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a nested mapping into a :class:`Config` (unknown keys and wrong types raise)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(values).__name__}")
    cfg = _build(Config, _migrate_legacy_keys(values, source), "", source)
    _check_ranges(cfg, source)
    return cfg


def _migrate_legacy_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Read the config.yaml of runs made before a key was renamed (their checkpoints stay evaluable).

    ``augment.teacher_sees_augmented`` (bool) became ``augment.teacher_view``: true -> ``augmented``,
    false -> ``clean``. Giving both is an error.
    """
    augment = values.get("augment")
    if not isinstance(augment, dict) or "teacher_sees_augmented" not in augment:
        return values
    if "teacher_view" in augment:
        raise ConfigError(f"{source}: 'augment.teacher_sees_augmented' is the old name of 'augment.teacher_view'; "
                          "give only 'augment.teacher_view'")
    old = augment["teacher_sees_augmented"]
    if not isinstance(old, bool):
        raise ConfigError(f"{source}: 'augment.teacher_sees_augmented' must be true or false, got {old!r}")
    values = {**values, "augment": {k: v for k, v in augment.items() if k != "teacher_sees_augmented"}}
    values["augment"]["teacher_view"] = "augmented" if old else "clean"
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'section.key=value'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    values = copy.deepcopy(values) if values else {}
    for text in overrides or []:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    values: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    values = apply_overrides(values, overrides)
    cfg = config_from_dict(values, source)
    if path is not None:
        _resolve_relative_paths(cfg, Path(path).resolve().parent)
    return cfg


_PATH_FIELDS = (
    ("data", "root"), ("data", "metadata_csv"), ("data", "train_csv"), ("data", "val_csv"), ("data", "test_csv"),
    ("data", "npz_file"), ("data", "split_file"), ("data", "cache_dir"), ("student", "weights_file"), ("teacher", "file"),
    ("prompt", "probe_file"), ("train", "feature_cache_dir"),
)


CACHE_LOCATION_FIELDS = (("data", "cache_dir"), ("train", "feature_cache_dir"))
"""Where exact caches live (decoded images, teacher features): not part of what an experiment is."""


def experiment_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict (``Config.to_dict()``) reduced to what decides a run's result.

    Two runs are the same experiment when these agree: file paths are compared resolved (a
    snapshot written with ``../shared/...`` and one with the absolute path name the same file),
    and the cache locations of :data:`CACHE_LOCATION_FIELDS` are left out (a cache holds exactly
    what would be recomputed, wherever it lives). Used to reuse finished runs, also from an
    archive made on another checkout, without reusing a run made with other settings.
    """
    out = {section: dict(body) if isinstance(body, dict) else body for section, body in values.items()}
    for section, name in _PATH_FIELDS:
        body = out.get(section)
        if not isinstance(body, dict) or name not in body:
            continue
        if (section, name) in CACHE_LOCATION_FIELDS:
            del body[name]
        elif body[name]:
            body[name] = str(Path(body[name]).expanduser().resolve())
    return out


def _resolve_relative_paths(cfg: Config, base: Path) -> None:
    """Paths in a config file are relative to the repository root when they exist there, else to the file.

    Shipped configs name ``../shared/...`` relative to the project root (the working directory
    of every documented command); a hospital's own config usually sits next to its data.
    """
    for section, name in _PATH_FIELDS:
        value = getattr(getattr(cfg, section), name)
        if not value or Path(value).is_absolute() or value.startswith("~"):
            continue
        if not Path(value).exists() and (base / value).exists():
            setattr(getattr(cfg, section), name, str((base / value).resolve()))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
