"""Config loading: typed validation, clear errors, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fopro_kd.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.epochs > 0


def test_defaults_roundtrip_through_yaml(tmp_path: Path) -> None:
    cfg = config_from_dict({"train": {"method": "ekd"}, "teacher": {"source": "none"}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()


def test_unknown_key_names_key_and_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*train\.epochs"):
        config_from_dict({"train": {"epoch": 3}})


def test_unknown_section_names_it() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        config_from_dict({"trian": {}})


def test_wrong_type_names_field() -> None:
    with pytest.raises(ConfigError, match="'train.batch_size' must be an integer"):
        config_from_dict({"train": {"batch_size": "32"}})


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        config_from_dict({"train": {"epochs": True}})


def test_literal_value_suggests_nearest() -> None:
    with pytest.raises(ConfigError, match=r"'train.method' must be one of .*did you mean 'fopro-kd'"):
        config_from_dict({"train": {"method": "fopro_kd"}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"lr": -0.1}}, "'train.lr' must be > 0"),
        ({"data": {"imbalance_factor": 0.5}}, "imbalance factor"),
        ({"prompt": {"eps": 1.5}}, r"'prompt.eps' must be in \(0, 1\]"),
        ({"split": {"val_fraction": 0.6, "test_fraction": 0.5}}, "val_fraction"),
        ({"federation": {"min_available_clients": 9, "num_clients": 4}}, "min_available_clients"),
        ({"teacher": {"source": "file"}}, "teacher.file"),
        ({"data": {"num_classes": 1}}, "num_classes"),
    ],
)
def test_out_of_range_values_rejected(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_int_accepted_for_float_and_list_for_tuple() -> None:
    cfg = config_from_dict({"train": {"lr": 1}, "teacher": {"source": "none", "mean": [0.5, 0.5, 0.5]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.teacher.mean == (0.5, 0.5, 0.5)


def test_tuple_length_checked() -> None:
    with pytest.raises(ConfigError, match="'teacher.mean' must have 3 items"):
        config_from_dict({"teacher": {"mean": [0.5, 0.5]}})


def test_overrides_parse_yaml_values() -> None:
    values = apply_overrides({"train": {"epochs": 3}}, ["train.epochs=5", "teacher.mean=[0.5,0.5,0.5]", "seed=7"])
    assert values == {"train": {"epochs": 5}, "teacher": {"mean": [0.5, 0.5, 0.5]}, "seed": 7}


def test_override_without_equals_rejected() -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])


def test_missing_config_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match="site.yaml"):
        load_config(path)


def test_code_in_yaml_is_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_bare_off_in_yaml_means_the_choice_off(tmp_path) -> None:
    """YAML 1.1 reads `mode: off` as False; a choice field that has "off" takes it as "off"."""
    from fopro_kd.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("akd:\n  mode: off\nprivacy:\n  mode: off\n")
    cfg = load_config(path, ["akd.mode=off"])
    assert cfg.akd.mode == "off" and cfg.privacy.mode == "off"
    with pytest.raises(ConfigError, match="prompt.param"):
        load_config(path, ["prompt.param=off"])


def test_old_teacher_sees_augmented_key_is_read_as_teacher_view() -> None:
    assert config_from_dict({"augment": {"teacher_sees_augmented": False}}).augment.teacher_view == "clean"
    assert config_from_dict({"augment": {"teacher_sees_augmented": True}}).augment.teacher_view == "augmented"
    with pytest.raises(ConfigError, match="old name"):
        config_from_dict({"augment": {"teacher_sees_augmented": True, "teacher_view": "flips"}})


def test_experiment_settings_compare_files_not_spellings_and_ignore_cache_locations(tmp_path, monkeypatch) -> None:
    """Reusing a finished run: the same file named relatively or absolutely is the same experiment, a moved cache
    too; another data file is not."""
    from fopro_kd.config import experiment_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    relative = config_from_dict({"data": {"root": "data", "cache_dir": "c1"}, "train": {"feature_cache_dir": "f1"}})
    absolute = config_from_dict({"data": {"root": str(tmp_path / "data"), "cache_dir": "/elsewhere"},
                                 "train": {"feature_cache_dir": None}})
    other = config_from_dict({"data": {"root": str(tmp_path / "other")}})
    values = relative.to_dict()
    assert experiment_settings(values) == experiment_settings(absolute.to_dict())
    assert experiment_settings(values) != experiment_settings(other.to_dict())
    assert values["data"]["root"] == "data" and values["train"]["feature_cache_dir"] == "f1"  # input not changed
    lr = config_from_dict({"data": {"root": "data"}, "train": {"lr": 0.5}})
    assert experiment_settings(lr.to_dict()) != experiment_settings(absolute.to_dict())
