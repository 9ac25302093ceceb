"""Compressed model transfer: cast a state dict's floating tensors to fp16 / bf16 and back.

Pure functions, no Flower import: a client or server may apply them to the student's
``state_dict`` before packing it into a message, and undo them after unpacking. Integer
and boolean tensors (BatchNorm's ``num_batches_tracked``) are never cast, so they come
back bit-exact; floating tensors come back in the dtype of a reference state (``like``,
usually the receiver's own model) or float32.

* ``float16`` halves the bytes; values beyond fp16's range (|x| > 65504) would overflow,
  so such a tensor is left in its original dtype (rare: e.g. a huge BatchNorm variance).
* ``bfloat16`` halves the bytes with float32's range but 8 bits of mantissa. NumPy has no
  bfloat16: :func:`pack_for_numpy` carries it as its int16 bit pattern (what a Flower
  ``ArrayRecord`` can hold) and :func:`unpack_from_numpy` restores it.

Example
-------
>>> import torch
>>> state = {"w": torch.randn(4, 4), "n": torch.tensor(7)}
>>> small = compress_state(state, "float16")
>>> small["w"].dtype, small["n"].dtype
(torch.float16, torch.int64)
>>> back = decompress_state(small, like=state)
>>> back["w"].dtype, bool(back["n"] == 7)
(torch.float32, True)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "compress_state", "decompress_state", "encode_for_transfer", "pack_for_numpy",
           "restore_numpy_dtypes", "restore_torch_dtypes", "state_nbytes", "unpack_from_numpy"]

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FP16_MAX = float(torch.finfo(torch.float16).max)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(f"unsupported transfer dtype {dtype}; use one of {list(SUPPORTED_DTYPES)}")
        return dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported transfer dtype {dtype!r}; use one of {list(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[dtype]


def compress_state(state_dict: Mapping[str, Tensor], dtype: str | torch.dtype = "float16") -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose floating tensors are cast to ``dtype`` (detached, on the CPU).

    Integer / boolean tensors are copied unchanged. With ``float16`` a tensor whose values
    do not fit fp16's range (or is not finite) keeps its original dtype.
    """
    target = _dtype(dtype)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        tensor = value.detach().cpu()
        if not tensor.is_floating_point() or tensor.dtype == target:
            out[key] = tensor.clone()
            continue
        if target == torch.float16 and tensor.numel() and not bool(tensor.abs().max() <= _FP16_MAX):
            out[key] = tensor.clone()  # would overflow to inf: send this one uncompressed
            continue
        out[key] = tensor.to(target)
    return out


def decompress_state(
    compressed: Mapping[str, Tensor], like: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Undo :func:`compress_state`: floating tensors back to ``like``'s dtypes (float32 without ``like``).

    Raises ``KeyError`` if ``like`` is given and the keys differ, ``ValueError`` on a shape mismatch.
    """
    if like is not None and set(like) != set(compressed):
        missing, extra = set(like) - set(compressed), set(compressed) - set(like)
        raise KeyError(f"state keys differ from the reference: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    out: dict[str, Tensor] = {}
    for key, tensor in compressed.items():
        ref = like[key] if like is not None else None
        if ref is not None and tuple(ref.shape) != tuple(tensor.shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} differs from the reference {tuple(ref.shape)}")
        if tensor.is_floating_point():
            out[key] = tensor.to(ref.dtype if ref is not None else torch.float32)
        else:
            out[key] = tensor.clone() if ref is None else tensor.to(ref.dtype)
    return out


def pack_for_numpy(compressed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """bfloat16 tensors as their int16 bit pattern (NumPy/``ArrayRecord`` cannot hold bfloat16); others as is."""
    return {k: (v.view(torch.int16) if v.dtype == torch.bfloat16 else v) for k, v in compressed.items()}


def unpack_from_numpy(packed: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`pack_for_numpy`: int16 tensors whose reference is floating are bfloat16 bit patterns."""
    out: dict[str, Tensor] = {}
    for key, tensor in packed.items():
        if tensor.dtype == torch.int16 and like[key].is_floating_point():
            out[key] = tensor.view(torch.bfloat16)
        else:
            out[key] = tensor
    return out


def state_nbytes(state_dict: Mapping[str, Tensor]) -> int:
    """Bytes of the tensor payload (``numel * element_size`` summed), without any container overhead."""
    return int(sum(t.numel() * t.element_size() for t in state_dict.values()))


# --------------------------------------------------------------------------- message boundaries

_WIRE_NUMPY_DTYPE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.int16)}  # bf16 travels as int16 bits


def encode_for_transfer(state_dict: Mapping[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """What goes into a message's ArrayRecord: ``state_dict`` as is (``float32``) or compressed and packed."""
    if dtype == "float32":
        return dict(state_dict)
    return pack_for_numpy(compress_state(state_dict, dtype))


def restore_torch_dtypes(received: Mapping[str, Tensor], like: Mapping[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """Undo :func:`encode_for_transfer` on the receiving model's side, leniently.

    Only tensors that arrive in the wire dtype of ``dtype`` where ``like`` holds a floating
    tensor of the same name are converted (to ``like``'s dtype); anything else is passed on
    unchanged, so that ``load_state_dict`` still reports missing or mismatched names itself.
    """
    wire = _WIRE_NUMPY_DTYPE.get(_dtype_name(dtype))
    out: dict[str, Tensor] = {}
    for key, tensor in received.items():
        ref = like.get(key)
        if wire is not None and ref is not None and ref.is_floating_point() and _torch_matches(tensor, wire):
            tensor = (tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor).to(ref.dtype)
        out[key] = tensor
    return out


def restore_numpy_dtypes(
    received: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], dtype: str
) -> dict[str, np.ndarray]:
    """NumPy version of :func:`restore_torch_dtypes` for the server's validation and averaging.

    A floating array that arrives in another dtype than the wire dtype keeps it, so the
    server's dtype check rejects it with its usual message.
    """
    wire = _WIRE_NUMPY_DTYPE.get(_dtype_name(dtype))
    if wire is None:
        return dict(received)
    out: dict[str, np.ndarray] = {}
    for key, value in received.items():
        ref = reference.get(key)
        if ref is not None and np.issubdtype(ref.dtype, np.inexact) and value.dtype == wire:
            if wire == np.int16:  # bfloat16 bit pattern -> the top half of a float32
                value = (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            value = value.astype(ref.dtype)
        out[key] = value
    return out


def _dtype_name(dtype: str) -> str:
    _dtype(dtype)  # validates
    return str(dtype)


def _torch_matches(tensor: Tensor, wire: np.dtype) -> bool:
    return (wire == np.float16 and tensor.dtype == torch.float16) or (wire == np.int16 and tensor.dtype == torch.int16)
