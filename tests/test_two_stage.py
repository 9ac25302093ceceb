"""Two-stage FoPro-KD: exploration online, then a frozen prompt and cached T(FPG(v(x))) targets."""

from __future__ import annotations

import copy

import pytest
import torch

from fopro_kd.config import Config, ConfigError, config_from_dict
from fopro_kd.data import make_synthetic_imageset
from fopro_kd.data.transforms import to_float
from fopro_kd.models.student import build_student
from fopro_kd.models.teacher import build_teacher
from fopro_kd.prompt import build_prompt
from fopro_kd.training.feature_cache import apply_flip_view
from fopro_kd.training.teacher_view import teacher_targets
from fopro_kd.training.trainer import LocalTrainer

SIZE = 32
FLIPS_ONLY = {"affine_scale": [1.0, 1.0], "affine_translate": 0.0, "rotation_degrees": 0.0,
              "color_jitter": [0.0, 0.0, 0.0, 0.0], "teacher_view": "flips"}


def cfg_of(**sections) -> Config:
    values = {
        "data": {"image_size": SIZE, "num_classes": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"batch_size": 8, "epochs": 3, "method": "fopro-kd"},
        "augment": dict(FLIPS_ONLY),
    }
    for key, val in sections.items():
        values.setdefault(key, {}).update(val)
    return config_from_dict(values)


@pytest.fixture(scope="module")
def data():
    return make_synthetic_imageset([12, 8, 4], SIZE, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher(cfg_of().teacher)


def structured_prompt(cfg: Config):
    """A prompt far from the identity (so that a cache that ignored it would be caught)."""
    prompt = build_prompt(cfg.prompt, SIZE)
    with torch.no_grad():
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return prompt


def make_trainer(cfg: Config, data, teacher, prompt) -> LocalTrainer:
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, 3, teacher.feature_dim)
    return LocalTrainer(cfg, student, teacher, prompt, data.class_counts(), torch.device("cpu"))


def test_cache_is_exactly_the_prompted_teacher_for_every_view(data, teacher) -> None:
    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"})
    prompt = structured_prompt(cfg)
    trainer = make_trainer(cfg, data, teacher, prompt)
    trainer.enable_feature_cache(data)
    cache = trainer.feature_cache
    assert cache is not None and cache.num_views == 4
    idx = torch.tensor([0, 5, 17, 23])
    x = to_float(data.images[idx])
    identity = teacher_targets(teacher, x, None, "raw")
    for view in range(4):
        views = torch.full((len(idx),), view)
        online = teacher_targets(teacher, apply_flip_view(x, views), prompt, "raw")
        assert (cache.lookup(idx, views) - online).abs().max().item() < 1e-5
    # the prompt is in the targets: they differ from the un-prompted teacher's
    assert (cache.lookup(idx, torch.zeros(len(idx), dtype=torch.long)) - identity).abs().max().item() > 1e-3


def test_float16_cache_is_close_and_half_the_size(data, teacher) -> None:
    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"},
                 train={"cache_dtype": "float16"})
    trainer = make_trainer(cfg, data, teacher, structured_prompt(cfg))
    trainer.enable_feature_cache(data)
    full = make_trainer(cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"}),
                        data, teacher, structured_prompt(cfg))
    full.enable_feature_cache(data)
    assert trainer.feature_cache.nbytes * 2 == full.feature_cache.nbytes
    idx = torch.arange(len(data))
    diff = trainer.feature_cache.lookup(idx) - full.feature_cache.lookup(idx)
    assert diff.abs().max().item() < 1e-2 * full.feature_cache.lookup(idx).abs().max().item()


def test_cached_and_online_runs_give_the_same_losses(data, teacher) -> None:
    """Same frozen prompt, same seed: the cache changes where the target comes from, not what it is."""
    cached_cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"})
    online_cfg = cfg_of(akd={"mode": "off"})
    cached = make_trainer(cached_cfg, data, teacher, structured_prompt(cached_cfg))
    online = make_trainer(online_cfg, data, teacher, structured_prompt(online_cfg))
    for steps in (1, 2):
        a = cached.train(data, epochs=1, max_steps=steps)
        b = online.train(data, epochs=1, max_steps=steps)
        assert cached.feature_cache is not None and online.feature_cache is None
        for key in ("loss", "loss_rep", "loss_main"):
            if key in a.losses:
                assert a.losses[key] == pytest.approx(b.losses[key], abs=1e-5), key


def test_prompt_trains_while_exploring_then_freezes(data, teacher) -> None:
    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 1, "lr": 0.05}, akd={"mode": "discriminative"})
    prompt = build_prompt(cfg.prompt, SIZE)
    trainer = make_trainer(cfg, data, teacher, prompt)
    start = copy.deepcopy(prompt.state_dict())
    trainer.train(data, epochs=1)
    assert trainer.feature_cache is None  # still online during exploration
    explored = copy.deepcopy(prompt.state_dict())
    assert any(not torch.equal(start[k], explored[k]) for k in start), "the prompt did not train while exploring"
    result = trainer.train(data, epochs=2)
    assert trainer.feature_cache is not None
    assert all(torch.equal(explored[k], prompt.state_dict()[k]) for k in explored), "the prompt moved after freezing"
    assert "prompt_reg" not in result.losses  # no prompt step after exploration


def test_two_stage_bad_input_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="explore_epochs"):
        cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 3})
    with pytest.raises(ConfigError, match="teacher_view"):
        cfg_of(prompt={"schedule": "two_stage"}, augment={"teacher_view": "augmented"})
    # methods without a prompt ignore prompt.* (one config serves every method of a comparison) ...
    assert cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 3}, train={"method": "ekd"}).train.method == "ekd"
    bsm = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 3}, train={"method": "bsm"})
    # ... and the trainer does not run a two-stage schedule for them
    assert not LocalTrainer(bsm, build_student(bsm.student, 3, None), None, None, [4, 4, 4],
                            torch.device("cpu")).two_stage


def test_cache_over_the_memory_limit_is_refused_before_training(data, teacher) -> None:
    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"},
                 train={"max_cache_gb": 1e-9})
    trainer = make_trainer(cfg, data, teacher, structured_prompt(cfg))
    before = copy.deepcopy(trainer.student.state_dict())
    with pytest.raises(ValueError, match="max_cache_gb"):
        trainer.train(data, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())


def test_single_site_two_stage_run_records_the_prompt_diagnostics(tmp_path) -> None:
    """history.csv says per epoch how far the prompt moved (mask range, RMS deviation, teacher shift)."""
    import csv

    from fopro_kd.training.single_site import train_single_site

    cfg = config_from_dict({
        "seed": 3,
        "data": {"kind": "synthetic", "image_size": SIZE, "num_classes": 3, "max_per_class": 16},
        "split": {"val_per_class": 3, "test_per_class": 3},
        "student": {"arch": "test_resnet"},
        "teacher": {"arch": "test_resnet", "source": "none", "input_size": SIZE},
        "train": {"method": "fopro-kd", "epochs": 2, "batch_size": 8},
        "prompt": {"schedule": "two_stage", "explore_epochs": 1, "lr": 0.05},
        "augment": dict(FLIPS_ONLY),
    })
    metrics = train_single_site(cfg, tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert len(rows) == 2 and "last_epoch" in metrics
    for row in rows:
        low, high, dev = float(row["prompt_mask_min"]), float(row["prompt_mask_max"]), float(row["prompt_mask_dev"])
        assert low <= 1.0 <= high and dev > 0 and float(row["teacher_shift"]) > 0
    # frozen after exploration: the second epoch reports the same mask
    assert rows[0]["prompt_mask_dev"] == rows[1]["prompt_mask_dev"]


def test_student_view_cache_matches_the_online_student_view(data, teacher) -> None:
    """teacher_view 'student': the teacher sees the student's (flipped, downsized) input; cached = online."""
    from fopro_kd.data.transforms import resize_batch

    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"},
                 augment={"teacher_view": "student"}, student={"input_size": 16})
    prompt = structured_prompt(cfg)
    trainer = make_trainer(cfg, data, teacher, prompt)
    trainer.enable_feature_cache(data)
    x = to_float(data.images[:8])
    student_in, teacher_in, views = trainer._views(data.images[:8])
    assert teacher_in.shape[-1] == 16
    online = teacher_targets(teacher, teacher_in, prompt, "raw")
    cached = trainer.feature_cache.lookup(torch.arange(8), views)
    assert (cached - online).abs().max().item() < 1e-4
    # and it is not the full-resolution view's target
    full = teacher_targets(teacher, apply_flip_view(x, views), prompt, "raw")
    assert (cached - full).abs().max().item() > 1e-3
    assert torch.equal(teacher_in, resize_batch(apply_flip_view(x, views), 16)) or \
        (teacher_in - resize_batch(apply_flip_view(x, views), 16)).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="flips are the only augmentation"):
        cfg_of(train={"method": "ekd", "cache_teacher_features": True},
               augment={"teacher_view": "student", "rotation_degrees": 10.0})


def count_teacher_passes(monkeypatch) -> list[int]:
    """From now on, the size of every image set a feature cache runs the teacher on."""
    import fopro_kd.training.feature_cache as feature_cache

    built: list[int] = []
    real_build = feature_cache.TeacherFeatureCache.__init__

    def counting_init(self, teacher, images, *args, **kwargs):
        built.append(len(images))
        real_build(self, teacher, images, *args, **kwargs)

    monkeypatch.setattr(feature_cache.TeacherFeatureCache, "__init__", counting_init)
    return built


def test_feature_files_are_reused_and_a_damaged_one_is_rebuilt(data, teacher, tmp_path, monkeypatch) -> None:
    """train.feature_cache_dir: a second trainer (new process: memo cleared) reads the store, no teacher pass;
    a truncated store or a different prompt is never reused."""
    import fopro_kd.training.feature_cache as feature_cache

    cfg = cfg_of(prompt={"schedule": "two_stage", "explore_epochs": 0}, akd={"mode": "off"},
                 train={"feature_cache_dir": str(tmp_path / "features")})
    feature_cache.clear_feature_caches()
    first = make_trainer(cfg, data, teacher, structured_prompt(cfg))
    first.enable_feature_cache(data)
    files = list((tmp_path / "features").glob("teacher-store-*.pt"))
    assert len(files) == 1 and not list((tmp_path / "features").glob(".*.tmp"))
    built = count_teacher_passes(monkeypatch)
    feature_cache.clear_feature_caches()
    second = make_trainer(cfg, data, teacher, structured_prompt(cfg))
    second.enable_feature_cache(data)
    assert built == []  # read from the store
    idx = torch.arange(len(data))
    views = torch.arange(len(data)) % 4
    assert torch.equal(second.feature_cache.lookup(idx, views), first.feature_cache.lookup(idx, views))
    # a different prompt is a different store
    feature_cache.clear_feature_caches()
    other = make_trainer(cfg, data, teacher, build_prompt(cfg.prompt, SIZE))
    other.enable_feature_cache(data)
    assert built == [len(data)] and len(list((tmp_path / "features").glob("teacher-store-*.pt"))) == 2
    # a damaged store is rebuilt (and rewritten), never used
    files[0].write_bytes(files[0].read_bytes()[:100])
    feature_cache.clear_feature_caches()
    third = make_trainer(cfg, data, teacher, structured_prompt(cfg))
    third.enable_feature_cache(data)
    assert built == [len(data), len(data)]
    assert torch.equal(third.feature_cache.lookup(idx, views), first.feature_cache.lookup(idx, views))
    feature_cache.clear_feature_caches()


def test_the_store_runs_the_teacher_only_on_images_it_lacks(data, teacher, tmp_path, monkeypatch) -> None:
    """k-fold / another split: a second image set that overlaps the first computes only the new images, and every
    target equals the online teacher's (store entries are looked up by image content, not position)."""
    import fopro_kd.training.feature_cache as feature_cache

    cfg = cfg_of(train={"method": "ekd", "cache_teacher_features": True,
                        "feature_cache_dir": str(tmp_path / "features")})
    first_fold, second_fold = data.subset(list(range(0, 16))), data.subset(list(range(8, len(data)))[::-1])
    feature_cache.clear_feature_caches()
    make_trainer(cfg, first_fold, teacher, None).enable_feature_cache(first_fold)
    built = count_teacher_passes(monkeypatch)
    feature_cache.clear_feature_caches()
    trainer = make_trainer(cfg, second_fold, teacher, None)
    trainer.enable_feature_cache(second_fold)
    assert built == [len(data) - 16], "only the images the first set did not have"
    x = to_float(second_fold.images)
    for view in range(4):
        online = teacher_targets(teacher, apply_flip_view(x, torch.full((len(x),), view)), None, "raw").float()
        cached = trainer.feature_cache.lookup(torch.arange(len(x)), torch.full((len(x),), view))
        assert torch.allclose(cached, online, atol=1e-5), f"view {view}"
    feature_cache.clear_feature_caches()
    make_trainer(cfg, data, teacher, None).enable_feature_cache(data)  # the union is stored: nothing to compute
    assert built == [len(data) - 16]
    feature_cache.clear_feature_caches()


def test_a_store_is_not_shared_between_teacher_builds(data, teacher, tmp_path, monkeypatch) -> None:
    """A store is exact for one teacher build: the same weights in another memory layout, or built with other
    ``teacher.model_kwargs`` (padding changes features), compute their own targets instead of reading it."""
    import dataclasses

    import fopro_kd.training.feature_cache as feature_cache
    from fopro_kd.models.teacher import FrozenTeacher

    cfg = cfg_of(train={"method": "ekd", "cache_teacher_features": True,
                        "feature_cache_dir": str(tmp_path / "features")})
    feature_cache.clear_feature_caches()
    make_trainer(cfg, data, teacher, None).enable_feature_cache(data)
    built = count_teacher_passes(monkeypatch)
    plain = FrozenTeacher(copy.deepcopy(teacher.model), input_size=SIZE, weights_desc=teacher.weights_desc,
                          channels_last=False)
    feature_cache.clear_feature_caches()
    make_trainer(cfg, data, plain, None).enable_feature_cache(data)
    assert built == [len(data)], "another memory layout: own store"
    other = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, model_kwargs={"drop_rate": 0.0}))
    feature_cache.clear_feature_caches()
    make_trainer(other, data, teacher, None).enable_feature_cache(data)
    assert built == [len(data), len(data)], "other teacher.model_kwargs: own store"
    feature_cache.clear_feature_caches()
    make_trainer(cfg, data, teacher, None).enable_feature_cache(data)
    assert built == [len(data), len(data)], "the first build's store is still read"
    assert len(list((tmp_path / "features").glob("teacher-store-*.pt"))) == 3
    feature_cache.clear_feature_caches()
