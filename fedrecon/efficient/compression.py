"""Update compression for any strategy: top-k sparsification with error feedback, 8-bit
quantization, and the exact byte count of every message.

:class:`~fedrecon.runners.SimulationRunner` runs it when given
``compression=UpdateCompressor(cfg)``, between a site's ``fit`` (after the privacy
pipeline's site-side transform) and the server's checks:

- site side (:meth:`UpdateCompressor.at_site`): the update becomes a change of the GLOBAL
  tensors; the site adds its error-feedback residual (what earlier rounds' compression left
  out), compresses, keeps the new residual in its own store (LOCAL: round-versioned and
  checkpointed with the rest of the site's private state, so a resumed run continues with
  the same residual) and encodes the message (:mod:`.wire`);
- server side (:meth:`UpdateCompressor.at_server`): the bytes are decoded into a dense
  ``kind="delta"`` :class:`~fedrecon.federated.SiteUpdate`, which the strategy aggregates
  like any other.

``bytes_sent`` is the length of the encoded message; ``bytes_received`` the length of the
instructions encoded densely (:meth:`downlink_nbytes`): the server-to-site direction is not
compressed. Error feedback: Seide et al. 2014, Karimireddy et al. (EF-SGD), ICML 2019;
top-k: Stich et al., NeurIPS 2018.

Composition with ``[privacy]``: clipping/noise happen first (compression is
post-processing, DP is kept); secure aggregation is refused (the server must sum dense
masked vectors, there is nothing sparse to send).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedrecon.federated import SiteInstructions, SiteUpdate, StateDict
from fedrecon.federated.store import LocalStore

from .wire import ENCODINGS, EncodedTensor, Message, decode, dense, encode, torch_dtype

__all__ = [
    "COMPRESSION_METHODS",
    "RESIDUAL_KEY",
    "CompressionConfig",
    "UpdateCompressor",
    "compress_tensor",
    "decompress_tensor",
]

COMPRESSION_METHODS = ("none", "topk", "int8", "topk_int8")
#: Key of the error-feedback residual in a site's private state (its :class:`LocalStore`).
RESIDUAL_KEY = "compression_residual"


@dataclass(frozen=True)
class CompressionConfig:
    """The ``[compression]`` table.

    Attributes
    ----------
    method
        ``"none"`` (dense, but bytes are still counted as serialized), ``"topk"``,
        ``"int8"`` or ``"topk_int8"`` (top-k indices with int8 values).
    fraction
        Top-k: the share of each tensor's entries sent (at least one), in ``(0, 1]``.
    error_feedback
        Add what compression dropped in earlier rounds to the next update (kept at the site).
    """

    method: str = "none"
    fraction: float = 0.01
    error_feedback: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "[compression]") -> CompressionConfig:
        """Strict parse of the ``[compression]`` table (unknown keys and wrong types name the
        key), then :meth:`validate`."""
        from fedrecon.datasets.config import dataclass_from_dict

        cfg = dataclass_from_dict(cls, data, where)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "[compression]") -> None:
        if self.method not in COMPRESSION_METHODS:
            raise ValueError(f"{where}: key 'method' must be one of {list(COMPRESSION_METHODS)}; "
                             f"got {self.method!r}")
        if not (0 < self.fraction <= 1) or not math.isfinite(self.fraction):
            raise ValueError(f"{where}: key 'fraction' must lie in (0, 1]; got {self.fraction}")

    @property
    def lossy(self) -> bool:
        return self.method in ("int8", "topk_int8") or (self.method == "topk" and self.fraction < 1)


def _int8(values: Tensor) -> tuple[np.ndarray, float]:
    scale = float(values.abs().max()) / 127.0 if values.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return np.zeros(values.numel(), dtype=np.int8), 0.0
    q = torch.round(values.double() / scale).clamp_(-127, 127).to(torch.int8)
    return q.numpy(), scale


def _topk_count(fraction: float, numel: int) -> int:
    """``ceil(fraction * numel)``, at least 1 (0 for an empty tensor), with ``fraction`` taken
    as the decimal it was written as: 0.07 of 100 entries is 7, where the float product
    ``0.07 * 100 = 7.000000000000001`` would round up to 8."""
    if numel == 0:
        return 0
    return max(1, math.ceil(Fraction(repr(float(fraction))) * numel))


def compress_tensor(t: Tensor, method: str, fraction: float) -> EncodedTensor:
    """``t`` (a delta) encoded with ``method``; integer tensors always go dense, and so does a
    tensor with a non-finite entry (or one beyond float32's range), so that the server's
    finiteness checks see what the site computed instead of a quantized zero."""
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"argument 'method' must be one of {list(COMPRESSION_METHODS)}; "
                         f"got {method!r}")
    if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
            or not math.isfinite(fraction) or not 0 < fraction <= 1):
        raise ValueError(f"argument 'fraction' must be a number in (0, 1]; got {fraction!r}")
    t = t.detach().cpu()
    if method == "none" or not t.is_floating_point():
        return dense(t)
    flat = t.reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        return dense(t)
    dtype = str(t.dtype).removeprefix("torch.")
    if method == "int8":
        q, scale = _int8(flat)
        return EncodedTensor("int8", tuple(t.shape), dtype, [q], scale)
    k = _topk_count(fraction, flat.numel())
    if k >= flat.numel() and method == "topk":
        return dense(t)  # every entry: exact, in the tensor's own dtype
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    vals = flat[idx]
    if method == "topk":
        return EncodedTensor("topk", tuple(t.shape), dtype, [idx.int().numpy(), vals.numpy()])
    q, scale = _int8(vals)
    return EncodedTensor("topk_int8", tuple(t.shape), dtype, [idx.int().numpy(), q], scale)


def _check_encoded(e: EncodedTensor) -> int:
    """The number of entries of ``e``, after checking that its parts fit its shape (a
    malformed message is refused instead of decoded into wrong values)."""
    if e.encoding not in ENCODINGS:
        raise ValueError(f"encoded tensor: unknown encoding {e.encoding!r}; expected one of "
                         f"{list(ENCODINGS)}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in e.shape):
        raise ValueError(f"encoded tensor: shape {e.shape} must hold integers >= 0")
    numel = math.prod(e.shape)
    sizes = [int(p.size) for p in e.parts]
    sparse = e.encoding in ("topk", "topk_int8")
    if sparse:
        ok = (len(sizes) == 2 and sizes[0] == sizes[1] <= numel
              and np.issubdtype(e.parts[0].dtype, np.integer)
              and (sizes[0] == 0 or (int(e.parts[0].min()) >= 0 and int(e.parts[0].max()) < numel)))
    else:
        ok = sizes == [numel]
    if not ok:
        raise ValueError(f"encoded tensor: {e.encoding} parts of sizes {sizes} do not fit shape "
                         f"{e.shape} ({numel} entries"
                         f"{'; indices must be integers in [0, numel)' if sparse else ''})")
    if e.encoding in ("int8", "topk_int8") and (
            isinstance(e.scale, bool) or not isinstance(e.scale, (int, float))
            or not math.isfinite(e.scale) or e.scale < 0):
        raise ValueError(f"encoded tensor: {e.encoding} needs a finite scale >= 0; got {e.scale!r}")
    return numel


def decompress_tensor(e: EncodedTensor) -> Tensor:
    dtype = torch_dtype(e.dtype)
    numel = _check_encoded(e)
    if e.encoding == "dense":
        return torch.from_numpy(e.parts[0].copy()).to(dtype).reshape(e.shape)
    if e.encoding == "int8":
        return (torch.from_numpy(e.parts[0].astype(np.float32)) * e.scale).to(dtype).reshape(e.shape)
    out = torch.zeros(numel, dtype=torch.float32)
    idx = torch.from_numpy(e.parts[0].astype(np.int64))
    vals = torch.from_numpy(e.parts[1].astype(np.float32))
    if e.encoding == "topk_int8":
        vals = vals * e.scale
    out[idx] = vals
    return out.to(dtype).reshape(e.shape)


def _delta(update: SiteUpdate, start: Mapping[str, Tensor]) -> StateDict:
    if update.kind == "delta":
        return dict(update.tensors)
    return {k: v - start[k].to(v.dtype) for k, v in update.tensors.items()}


class UpdateCompressor:
    """Site-side compression (with error feedback) and server-side decoding for one run.

    Parameters
    ----------
    config
        A :class:`CompressionConfig` or its TOML table.
    on_message
        Called with ``(site id, round, bytes)`` for every uplink message as sent (audits,
        tests of the byte accounting).
    """

    def __init__(self, config: CompressionConfig | Mapping[str, Any] | None = None, *,
                 on_message: Callable[[str, int, bytes], None] | None = None) -> None:
        if config is None:
            config = CompressionConfig()
        self.config = config if isinstance(config, CompressionConfig) else CompressionConfig.from_dict(config)
        self.config.validate()
        self.on_message = on_message

    def check_privacy(self, privacy: Any | None) -> None:
        if privacy is not None and getattr(privacy, "masks_updates", False):
            raise ValueError("[compression] cannot be combined with [privacy] secure aggregation: "
                             "the server sums dense masked vectors, so there is nothing sparse or "
                             "quantized to send; drop one of the two tables")

    # -- site side --------------------------------------------------------------------------
    def at_site(self, round: int, update: SiteUpdate, start: Mapping[str, Tensor],
                store: LocalStore | None = None) -> bytes:
        """The encoded message of ``update`` (relative to ``start``, what the site received).

        With error feedback the site's residual is read from and written back to ``store``
        (under :data:`RESIDUAL_KEY`); without a store there is no error feedback.
        """
        cfg = self.config
        delta = _delta(update, start)
        feedback = cfg.error_feedback and cfg.lossy and store is not None
        private: dict[str, Any] = (store.get(update.site_id) or {}) if feedback else {}
        residual: Mapping[str, Tensor] = private.get(RESIDUAL_KEY, {})
        tensors: dict[str, EncodedTensor] = {}
        new_residual: StateDict = {}
        for name, value in delta.items():
            if feedback and value.is_floating_point() and name in residual:
                value = value + residual[name].to(value.dtype)
            enc = compress_tensor(value, cfg.method, cfg.fraction)
            tensors[name] = enc
            if feedback and value.is_floating_point():
                if enc.encoding == "dense":  # sent exactly (non-finite entries too): nothing left
                    new_residual[name] = torch.zeros_like(value, device="cpu")
                else:
                    new_residual[name] = (value - decompress_tensor(enc).to(value.dtype)).cpu()
        if feedback:
            private[RESIDUAL_KEY] = new_residual
            store.put(update.site_id, private)  # type: ignore[union-attr]
        header = {"site": update.site_id, "round": update.round, "kind": "delta",
                  "num_examples": update.num_examples,
                  "metrics": {k: float(v) for k, v in update.metrics.items()
                              if isinstance(v, (int, float)) and math.isfinite(v)}}
        return encode(Message(header, tensors))

    # -- server side ------------------------------------------------------------------------
    @staticmethod
    def at_server(blob: bytes) -> SiteUpdate:
        """The dense ``kind="delta"`` update the server reads from ``blob``."""
        msg = decode(blob)
        h = msg.header
        tensors = {k: decompress_tensor(e) for k, e in msg.tensors.items()}
        return SiteUpdate(str(h["site"]), int(h["round"]), tensors, str(h["kind"]),
                          int(h["num_examples"]), dict(h["metrics"]))

    def transmit(self, round: int, update: SiteUpdate, start: Mapping[str, Tensor],
                 store: LocalStore | None = None) -> tuple[SiteUpdate, int]:
        """Site -> wire -> server: ``(the server's update, bytes on the wire)``."""
        blob = self.at_site(round, update, start, store)
        if self.on_message is not None:
            self.on_message(update.site_id, round, blob)
        return self.at_server(blob), len(blob)

    @staticmethod
    def encode_instructions(instructions: SiteInstructions) -> bytes:
        header = {"site": instructions.site_id, "round": instructions.round,
                  "plan": dataclasses.asdict(instructions.plan)}
        return encode(Message(header, {k: dense(v) for k, v in instructions.global_state.items()}))

    def downlink_nbytes(self, instructions: SiteInstructions) -> int:
        """Bytes of the server -> site message (dense: the downlink is not compressed)."""
        return len(self.encode_instructions(instructions))
