"""Offline-safe loading of timm models and their pretrained weights (teacher and student).

Generic: nothing here knows the teacher or the student, only an architecture, a weight
source (``file``, ``hub``, ``none``), the config prefix to name in errors and the error type
to raise. :mod:`fopro_kd.models.teacher` (the frozen teacher) and
:mod:`fopro_kd.models.student` (an ImageNet-initialised backbone) both build through
:func:`create_timm_model`, so both fail the same way: fast, naming the field to change.

Weight loading never hangs on an unreachable Hugging Face Hub: the Hub is probed with a short
timeout first and every failure becomes a :class:`WeightsLoadError` (by default the teacher
flavour :class:`TeacherLoadError`) that says how to point the config at a local file instead.
Every file-based load records the file's SHA-256 (:func:`file_sha256`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

logger = logging.getLogger("fopro_kd.models.teacher")  # the name these log lines had before the move (run logs)

__all__ = [
    "TeacherLoadError",
    "WeightsLoadError",
    "check_state_dict_compatible",
    "checked_create_model",
    "create_timm_model",
    "default_offline_hub",
    "feature_dim_of",
    "file_sha256",
    "read_state_dict",
]


class WeightsLoadError(RuntimeError):
    """Pretrained weights could not be loaded (missing file, wrong architecture, Hub unreachable)."""


class TeacherLoadError(WeightsLoadError):
    """The teacher's weights could not be loaded; the message says which ``teacher.*`` field to fix."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks.

    Every run records the hash of the teacher's weight file (method.md §3.2) so that results can
    be traced to the exact weights even when a file of the same name is later replaced.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_dim_of(model: nn.Module) -> int:
    """Size of the pooled pre-logits feature of a timm model created with ``num_classes=0``.

    ``head_hidden_size`` is used when present because it can differ from ``num_features``
    (mobilenetv3_small_100: 1024 pre-logits vs 576 channels in the last feature map).
    """
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(
            f"cannot tell the feature size of {type(model).__name__}: it has neither 'head_hidden_size' nor "
            "'num_features'; use a timm model created with num_classes=0"
        )
    return dim


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classifier(s) named in the model's pretrained config (e.g. ``fc.``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{name}." for name in names)


def read_state_dict(path: Path, field: str, error_cls: type[WeightsLoadError]) -> dict[str, Any]:
    """Load a state dict (``.pth``/``.pt``/``.bin`` with ``weights_only=True``, or ``.safetensors``).

    Uses timm's own reader so that wrapped checkpoints (``{"state_dict": ...}``, ``module.``
    prefixes) are unwrapped exactly as timm will unwrap them when it loads the file.
    """
    from timm.models import load_state_dict

    try:
        state_dict = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader error means "not a usable checkpoint"
        raise error_cls(
            f"{field}: cannot read weights file {path} ({type(exc).__name__}: {exc}). It must be a plain "
            "state dict saved with torch.save(model.state_dict(), path) or a .safetensors file; pickled "
            "model objects are refused (weights_only=True)."
        ) from exc
    if not isinstance(state_dict, dict) or not state_dict:
        raise error_cls(f"{field}: weights file {path} holds no state dict (got {type(state_dict).__name__})")
    return state_dict


def check_state_dict_compatible(
    model: nn.Module,
    state_dict: dict[str, Any],
    *,
    source: str,
    field: str,
    arch: str,
    error_cls: type[WeightsLoadError] = WeightsLoadError,
    check_shapes: bool = True,
) -> list[str]:
    """Raise when ``state_dict`` is not a checkpoint of ``model``'s architecture.

    timm loads a pretrained file with ``strict=False`` as soon as the classifier is dropped
    (``num_classes=0``), so a checkpoint of *another* architecture would load partially and
    silently leave random layers. This check compares keys, ignoring the classifier, and
    reports the first missing or unexpected key.

    Parameters
    ----------
    model
        The freshly created model (classifier removed).
    state_dict
        The checkpoint's tensors.
    source, field, arch
        Used in the error message: the file path, the config field naming it, the architecture.
    error_cls
        The error type to raise (teacher or student flavour).
    check_shapes
        Raise on the first shape mismatch too. When ``False`` the mismatching keys are returned
        instead, because timm's per-model checkpoint filter may legitimately resize some of them
        (e.g. a ViT position embedding for another image size).

    Returns
    -------
    list of str
        Keys whose shapes differ (empty when ``check_shapes`` is True).
    """
    skip = _classifier_prefixes(model)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(skip)}
    hint = (
        f"it does not look like a timm '{arch}' checkpoint. Check that '{field}' points at weights of "
        f"that architecture (or change the '.arch' field to the checkpoint's architecture)"
    )
    for key in expected:
        if key not in given:
            raise error_cls(f"{source}: key '{key}' is missing from the weights file; {hint}.")
    for key in given:
        if key not in expected:
            raise error_cls(f"{source}: unexpected key '{key}' in the weights file; {hint}.")
    mismatched = []
    for key, tensor in expected.items():
        other = given[key]
        if isinstance(other, Tensor) and tuple(other.shape) != tuple(tensor.shape):
            if check_shapes:
                raise error_cls(
                    f"{source}: key '{key}' has shape {tuple(other.shape)} in the weights file but "
                    f"{tuple(tensor.shape)} in the model; {hint}."
                )
            mismatched.append(key)
    return mismatched


def checked_create_model(arch: str, prefix: str, error_cls: type[WeightsLoadError], **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a bad ``model_kwargs`` entry turned into one clear error naming the field.

    timm passes unknown keyword arguments to the model class, which raises ``TypeError``
    (``ResNet.__init__() got an unexpected keyword argument 'pad_type'``): a 23-line traceback
    after the data was decoded, before this wrapper (issue 14).
    """
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as exc:
        extra = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes", "pretrained_cfg_overlay")}
        raise error_cls(
            f"'{prefix}.model_kwargs' {extra} is not accepted by timm '{arch}' ({exc}); remove the keyword or "
            f"choose the architecture it belongs to ('{prefix}.arch')"
        ) from exc


def _hub_endpoint_reachable(timeout_s: float) -> bool:
    """TCP-connect to the Hub endpoint within ``timeout_s`` (DNS included, run in a daemon thread).

    ``socket.create_connection`` has no timeout for name resolution, hence the thread: a
    hospital machine without internet must get an answer in seconds, not after the ≈ 47 s of
    retries huggingface_hub performs by default.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides reachability; rely on huggingface_hub's own timeouts
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_settings(timeout_s: float, offline: bool) -> Iterator[None]:
    """Temporarily bound huggingface_hub's timeouts (and force offline mode when asked).

    huggingface_hub reads ``HF_HUB_ETAG_TIMEOUT``/``HF_HUB_DOWNLOAD_TIMEOUT``/``HF_HUB_OFFLINE``
    into module constants at import time, so the constants are patched along with the environment.
    """
    seconds = max(1, math.ceil(timeout_s))
    env = {"HF_HUB_ETAG_TIMEOUT": str(seconds), "HF_HUB_DOWNLOAD_TIMEOUT": str(seconds)}
    attrs: dict[str, Any] = {"HF_HUB_ETAG_TIMEOUT": seconds, "HF_HUB_DOWNLOAD_TIMEOUT": seconds}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        attrs["HF_HUB_OFFLINE"] = True
    old_env = {name: os.environ.get(name) for name in env}
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm requires huggingface_hub for hub weights
        constants = None
    old_attrs = {name: getattr(constants, name) for name in attrs if constants is not None and hasattr(constants, name)}
    os.environ.update(env)
    for name in old_attrs:
        setattr(constants, name, attrs[name])
    try:
        yield
    finally:
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, value in old_attrs.items():
            setattr(constants, name, value)


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def default_offline_hub() -> None:
    """Make offline the default for the Hugging Face Hub: ``HF_HUB_OFFLINE=1`` unless the user set it.

    Why: a hospital's node usually has no route to the Hub, and a library that tries it waits on
    network timeouts before failing; offline, a missing teacher fails at once with the message
    of :func:`create_timm_model` naming ``teacher.file``. An explicit choice still wins:
    ``HF_HUB_OFFLINE=0`` (or any value) in the environment is left as it is, so
    ``teacher.source: hub`` can download where the Hub is reachable.

    Called once at import by every entry point (the library CLI, the Flower client and server
    apps, the simulation and the benchmarks), before their other imports. huggingface_hub reads
    the variable into ``constants.HF_HUB_OFFLINE`` when it is first imported; importing this module
    imports it (through timm), so when this call sets the variable it sets the constant too.
    """
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm requires huggingface_hub
        return
    constants.HF_HUB_OFFLINE = True


def create_timm_model(
    arch: str,
    *,
    source: str,
    file: str | os.PathLike[str] | None = None,
    overlay: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    hub_timeout_s: float = 10.0,
    prefix: str = "teacher",
    file_field: str = "file",
    error_cls: type[WeightsLoadError] = TeacherLoadError,
) -> tuple[nn.Module, str]:
    """Create a timm model with ``num_classes=0`` and weights from a file, the Hub or nowhere.

    Shared by the teacher and the ImageNet-initialised student so that both fail the same way:
    fast, and with a message naming the config field to change (``<prefix>.<file_field>``).

    Parameters
    ----------
    arch
        timm architecture name.
    source
        ``"file"`` (local checkpoint), ``"hub"`` (timm's default pretrained tag) or ``"none"``.
    file
        Weights file for ``source="file"``.
    overlay
        Extra ``pretrained_cfg_overlay`` entries (e.g. ``mean``/``std``).
    model_kwargs
        Extra ``timm.create_model`` keyword arguments (e.g. ``pad_type="same"``, ``drop_rate``).
    hub_timeout_s
        Bound on each Hub request; an unreachable Hub fails within about this time.
    prefix, file_field
        Config section and field used in error messages.
    error_cls
        Error type raised on failure.

    Returns
    -------
    (model, weights_desc)
        The model and a one-line description of its weights (path + sha256, Hub id, or random).
    """
    kwargs = dict(model_kwargs or {})
    overlay = dict(overlay or {})
    if ":" not in arch and not timm.is_model(arch.split(".", 1)[0]):
        raise error_cls(f"'{prefix}.arch': unknown timm architecture {arch!r} (see timm.list_models())")
    file_hint = f"set '{prefix}.source: file' and '{prefix}.{file_field}: /path/to/weights.pth|.safetensors'"
    if prefix == "student":
        file_hint = f"set '{prefix}.{file_field}: /path/to/weights.pth|.safetensors' (or '{prefix}.init: random')"

    if source == "none":
        model = checked_create_model(arch, prefix, error_cls, pretrained=False, num_classes=0, **kwargs)
        return model, "random (no weights)"

    if source == "file":
        if not file:
            raise error_cls(f"'{prefix}.{file_field}' is not set: {file_hint}")
        path = Path(file).expanduser()
        if not path.is_file():
            raise error_cls(
                f"{prefix}.{file_field}: weights file not found: {path} (resolved to {path.resolve()}). "
                f"Fix '{prefix}.{file_field}' in the config or pass --set {prefix}.{file_field}=/path/to/weights"
            )
        state_dict = read_state_dict(path, f"{prefix}.{file_field}", error_cls)
        shell = checked_create_model(arch, prefix, error_cls, pretrained=False, num_classes=0, **kwargs)
        mismatched = check_state_dict_compatible(
            shell, state_dict, source=str(path), field=f"{prefix}.{file_field}", arch=arch,
            error_cls=error_cls, check_shapes=False,
        )
        del shell, state_dict
        try:
            model = timm.create_model(
                arch, pretrained=True, num_classes=0,
                pretrained_cfg_overlay=dict(file=str(path), **overlay), **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - shape errors from load_state_dict and friends
            first = f" (first mismatching key: '{mismatched[0]}')" if mismatched else ""
            kwargs_hint = f" and that '{prefix}.model_kwargs' matches how they were trained" if prefix == "teacher" else ""
            reason = str(exc).rstrip(".")
            raise error_cls(
                f"{path}: cannot load into timm '{arch}'{first}: {reason}. Check that '{prefix}.{file_field}' "
                f"holds weights of this architecture{kwargs_hint}"
            ) from exc
        digest = file_sha256(path)
        desc = f"{path.resolve()} (sha256 {digest})"
        logger.info("%s weights: %s", prefix, desc)
        return model, desc

    if source != "hub":
        raise error_cls(f"'{prefix}.source' must be one of hub, file, none, demo; got {source!r}")

    offline = _env_offline()
    reachable = offline or _hub_endpoint_reachable(hub_timeout_s)
    if not reachable:
        logger.warning("Hugging Face Hub unreachable within %.0f s; trying the local Hub cache only", hub_timeout_s)
    try:
        with _hub_settings(hub_timeout_s, offline=offline or not reachable):
            model = checked_create_model(arch, prefix, error_cls, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay,
                            **kwargs)
    except WeightsLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, HTTP errors, "no pretrained weights"
        why = "HF_HUB_OFFLINE is set and the weights are not in the local Hub cache" if offline else (
            "the Hugging Face Hub is unreachable and the weights are not cached" if not reachable
            else "downloading from the Hugging Face Hub failed")
        raise error_cls(
            f"{prefix}: cannot get pretrained '{arch}' weights from the Hub: {why} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). To use a local checkpoint, {file_hint}."
        ) from exc
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = cfg.get("hf_hub_id") or f"{arch}.{cfg.get('tag', '')}".rstrip(".")
    desc = f"hub:{tag}"
    cached = _hub_cached_file(cfg.get("hf_hub_id"))
    if cached is not None:
        desc += f" ({cached} sha256 {file_sha256(cached)})"
    logger.info("%s weights: %s", prefix, desc)
    return model, desc


def _hub_cached_file(repo_id: str | None) -> str | None:
    """Local cache path of a Hub weight file, so its hash can be logged (``None`` if not found)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001
            return None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None
