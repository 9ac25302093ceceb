"""Config choices and registries name the same things.

Each registry below is the list the code builds from (losses, server strategies, partitioners,
prompt objectives = ``akd.mode``, prompt parametrisations, ...); the config repeats the names
as a ``Literal`` so that a typo fails at load time, naming the field. Nothing else keeps the two
lists in step, so this test does, per registry:

* the config's ``Literal`` holds exactly the registered names (a name only in the config would
  pass validation and fail when built; one only in the registry could never be chosen);
* every registered name is accepted by :func:`fopro_kd.config.config_from_dict`;
* an unknown name is rejected with one :class:`~fopro_kd.config.ConfigError` that names the
  field and the valid choices, and a near miss gets the nearest valid name as a hint.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from fopro_kd.config import Config, ConfigError, config_from_dict


def _losses() -> list[str]:
    from fopro_kd.losses import list_losses

    return list_losses()


def _strategies() -> list[str]:
    from server.strategies import list_strategies

    return list_strategies()


def _fedmas_rules() -> list[str]:
    from fopro_kd.federation.fedmas import FEDMAS_RULES

    return list(FEDMAS_RULES)


def _partitioners() -> list[str]:
    from fopro_kd.data.partition import list_partitioners

    return list_partitioners()


def _akd_modes() -> list[str]:
    from fopro_kd.prompt_objectives import PROMPT_OBJECTIVES

    return ["off", *PROMPT_OBJECTIVES]  # "off": no objective, the prompt is not trained


def _prompt_params() -> list[str]:
    from fopro_kd import prompt

    return list(prompt._PARAMS)  # the parametrisations FourierPrompt builds


def _prompt_ffts() -> list[str]:
    from fopro_kd import prompt

    return list(prompt._FFTS)


def _prompt_inits() -> list[str]:
    from fopro_kd import prompt

    return list(prompt._INITS)


def _accountants() -> list[str]:
    from fopro_kd.privacy.accounting import ACCOUNTANTS

    return list(ACCOUNTANTS)


def _transfer_dtypes() -> list[str]:
    from fopro_kd.compression import SUPPORTED_DTYPES

    return list(SUPPORTED_DTYPES)


def _cache_dtypes() -> list[str]:
    from fopro_kd.training import feature_cache

    return list(feature_cache._DTYPES)


REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "train.loss": _losses,  # fopro_kd/losses.py LOSSES (@register_loss)
    "federation.strategy": _strategies,  # server/strategies/__init__.py STRATEGIES
    "federation.fedmas_rule": _fedmas_rules,  # server/strategies/fedmas.py FEDMAS_RULES
    "federation.partition.kind": _partitioners,  # fopro_kd/data/partition.py PARTITIONERS
    "akd.mode": _akd_modes,  # fopro_kd/prompt_objectives.py PROMPT_OBJECTIVES (+ off)
    "prompt.param": _prompt_params,  # fopro_kd/prompt.py
    "prompt.fft": _prompt_ffts,
    "prompt.init": _prompt_inits,
    "privacy.accountant": _accountants,  # fopro_kd/privacy/accounting.py ACCOUNTANTS
    "federation.transfer_dtype": _transfer_dtypes,  # fopro_kd/compression.py SUPPORTED_DTYPES
    "train.cache_dtype": _cache_dtypes,  # fopro_kd/training/feature_cache.py
}


def config_choices(path: str) -> tuple[Any, ...]:
    """The ``Literal`` choices of the config field at dotted ``path`` (walking the dataclasses)."""
    tp: Any = Config
    for part in path.split("."):
        assert dataclasses.is_dataclass(tp), f"{path}: {part!r} is not inside a config section"
        tp = get_type_hints(tp)[part]
    assert get_origin(tp) is Literal, f"{path} is not a Literal field (got {tp})"
    return get_args(tp)


def nested(path: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def field_value(cfg: Config, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


REGISTERED = [(path, name) for path, names in REGISTRIES.items() for name in names()]

NEEDS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    # the probe initialises the radial rings from the file `fopro-kd probe` writes (not read at load time)
    ("prompt.init", "probe"): {"prompt": {"param": "radial", "probe_file": "frequency_preference.json"}},
}
"""Other fields a registered name needs to pass the config's cross-field checks."""


@pytest.mark.parametrize("path", list(REGISTRIES))
def test_config_choices_are_exactly_the_registered_names(path: str) -> None:
    registered = REGISTRIES[path]()
    choices = config_choices(path)
    assert registered, f"{path}: empty registry"
    only_config = sorted(set(choices) - set(registered))
    only_registry = sorted(set(registered) - set(choices))
    assert not only_config and not only_registry, (
        f"'{path}': the config's Literal and the registry disagree: only in the config {only_config} "
        f"(would validate, then fail when built), only in the registry {only_registry} (can never be chosen)"
    )


@pytest.mark.parametrize(("path", "name"), REGISTERED, ids=[f"{p}={n}" for p, n in REGISTERED])
def test_config_accepts_every_registered_name(path: str, name: str) -> None:
    values = nested(path, name)
    for section, extra in NEEDS.get((path, name), {}).items():
        values.setdefault(section, {}).update(extra)
    assert field_value(config_from_dict(values), path) == name


@pytest.mark.parametrize("path", list(REGISTRIES))
def test_config_rejects_an_unknown_name_naming_the_field_and_the_nearest_valid_one(path: str) -> None:
    registered = REGISTRIES[path]()
    with pytest.raises(ConfigError, match=rf"'{re.escape(path)}' must be one of .*got 'no-such-name'$"):
        config_from_dict(nested(path, "no-such-name"))
    near_miss = registered[-1] + "x"
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(nested(path, near_miss))
    message = str(excinfo.value)
    assert f"'{path}'" in message and all(repr(n) in message for n in registered), message
    hint = re.search(r"did you mean '([^']+)'\?", message)
    assert hint is not None and hint.group(1) in registered, message


def test_strategy_traits_of_the_protocol_agree_with_the_server_classes() -> None:
    """The client reads ``needs_class_counts`` from fopro_kd/federation/strategies.py, the server from its classes."""
    from fopro_kd.federation.strategies import CLASS_COUNT_STRATEGIES, FEDMAS_STRATEGY, needs_class_counts
    from server.strategies import STRATEGIES, FedMASStrategy

    for name, cls in STRATEGIES.items():
        assert needs_class_counts(name) == bool(cls.needs_class_counts), name
    assert CLASS_COUNT_STRATEGIES <= set(STRATEGIES)
    assert STRATEGIES[FEDMAS_STRATEGY] is FedMASStrategy
