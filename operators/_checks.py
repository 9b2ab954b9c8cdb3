"""Argument validation shared by the operators: errors name the argument and the expected shape."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor


def format_shape(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"argument '{name}' must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_trailing_shape(name: str, x: Tensor, expected: Sequence[int], owner: str = "") -> None:
    """Raise ``ValueError`` unless ``x.shape`` ends with ``expected``."""
    check_tensor(name, x)
    n = len(expected)
    if x.ndim < n or tuple(x.shape[x.ndim - n :]) != tuple(expected):
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}argument '{name}' must have shape {format_shape(['...', *expected])}; "
            f"got {format_shape(tuple(x.shape))}"
        )


def check_complex(name: str, x: Tensor, owner: str = "") -> None:
    if not x.is_complex():
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}argument '{name}' must be complex (torch.complex64/complex128); got {x.dtype}"
        )


def check_real(name: str, x: Tensor, owner: str = "") -> None:
    if x.is_complex() or not x.is_floating_point():
        where = f"{owner}: " if owner else ""
        raise ValueError(
            f"{where}argument '{name}' must be real floating point (float32/float64); got {x.dtype}"
        )


def check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"argument '{name}' must contain only finite values; got NaN or Inf")


def check_finite_number(name: str, value: float) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` when it is NaN or infinite."""
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"argument '{name}' must be a finite number; got {value}")
    return out


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"argument '{name}' must be a finite positive number; got {value}")
    return value


def _integer(value: object) -> int | None:
    """``value`` as an int when it is an integer number (Python, numpy, a 0-d tensor, or a
    float with an integer value), else None; bools are not numbers here."""
    if isinstance(value, Tensor):
        if value.ndim != 0 or value.is_complex():
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return int(value) if math.isfinite(value) and float(value).is_integer() else None


def as_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an int (see ``_integer``), at least ``minimum``; ``ValueError`` naming
    ``name`` otherwise (a silently truncated 10.5 would change the geometry)."""
    out = _integer(value)
    if out is None:
        raise ValueError(f"argument '{name}' must be an int; got {value!r}")
    if minimum is not None and out < minimum:
        raise ValueError(f"argument '{name}' must be >= {minimum}; got {out}")
    return out


def as_image_size(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an int ``N`` (square) or a pair of positive ints."""
    single = _integer(size)
    if single is not None:
        pair: tuple[int | None, ...] = (single, single)
    else:
        try:
            pair = tuple(_integer(s) for s in size)  # type: ignore[union-attr]
        except TypeError:
            pair = ()
    if len(pair) != 2 or any(s is None or s < 1 for s in pair):
        raise ValueError(f"argument '{name}' must be a positive int or a pair (H, W) of positive "
                         f"ints; got {size!r}")
    return pair  # type: ignore[return-value]


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def complex_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)
