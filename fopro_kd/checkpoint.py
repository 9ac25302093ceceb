"""Atomic, checksummed checkpoints that load with ``weights_only=True``.

A checkpoint is written to a temporary file in the same folder, fsync'ed and renamed
over the target, and its SHA-256 is stored in a ``.sha256`` sidecar written the same
way. A crash mid-write therefore leaves either the previous good checkpoint or none,
never a half-written file that looks valid; a truncated or edited file fails the
checksum and is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or belongs to another model or run."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> str:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts only) atomically; return its SHA-256."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    _atomic_write_bytes(path, data)
    _atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
    return digest


def verify_checkpoint(path: str | Path) -> str:
    """Check ``path`` against its ``.sha256`` sidecar *and require the sidecar*; return the digest.

    :func:`load_checkpoint` verifies a sidecar when there is one, so a file copied without it (or
    hand-made) loads unverified: a flipped byte in such a file is evaluated without a warning
    (issue 14). Commands that score a checkpoint call this first; ``fopro-kd evaluate --no-verify``
    skips it for a file that has no sidecar (a sidecar that does not match is always refused).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no checksum ({sidecar.name} is missing), so its integrity cannot be verified; "
            f"copy the sidecar with it, or pass --no-verify to use it unverified"
        )
    text = sidecar.read_text().strip()
    expected = text.split()[0] if text else ""
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected != actual:
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated: SHA-256 {actual[:12]}... does not match "
            f"{sidecar.name} ({expected[:12] or 'empty'}...)"
        )
    return actual


def load_checkpoint(path: str | Path, expected_format: str | None = None) -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        actual = hashlib.sha256(data).hexdigest()
        if expected != actual:
            raise CheckpointError(
                f"checkpoint {path} is corrupted or truncated: SHA-256 {actual[:12]}... does not match "
                f"{sidecar.name} ({expected[:12]}...)"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path} cannot be read safely (weights_only=True): {exc}") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict payload")
    if expected_format is not None and payload.get("format") != expected_format:
        raise CheckpointError(
            f"checkpoint {path} has format {payload.get('format')!r}, expected {expected_format!r}"
        )
    return payload
