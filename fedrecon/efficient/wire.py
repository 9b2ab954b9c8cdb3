"""The byte format of the messages whose sizes the runner records.

A message is ``b"FRM1" | u32 header length | header (UTF-8 JSON) | payload``. The header
names every tensor with its encoding, shape, dtype and byte count; the payload is the raw
little-endian bytes, tensor after tensor. Encodings (see :mod:`.compression`):

- ``dense``: the tensor's own dtype, every entry;
- ``topk``: ``k`` int32 flat indices, then ``k`` float32 values;
- ``int8``: every entry as int8, with a float scale in the header (``x ~ scale * q``);
- ``topk_int8``: ``k`` int32 indices, then ``k`` int8 values (scale in the header).

``len(encode(...))`` is the exact number of bytes the message takes on the wire.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["EncodedTensor", "Message", "encode", "decode", "ENCODINGS"]

MAGIC = b"FRM1"
ENCODINGS = ("dense", "topk", "int8", "topk_int8")


@dataclass
class EncodedTensor:
    """One tensor as sent: ``parts`` are the arrays written to the payload, in order."""

    encoding: str
    shape: tuple[int, ...]
    dtype: str  # the decoded tensor's torch dtype, e.g. "float32"
    parts: list[np.ndarray]
    scale: float | None = None


@dataclass
class Message:
    """A header (plain JSON values: site, round, kind, counts, metrics) and named tensors."""

    header: dict[str, Any]
    tensors: dict[str, EncodedTensor] = field(default_factory=dict)


def _np(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def encode(message: Message) -> bytes:
    entries = []
    payload = []
    for name, t in message.tensors.items():
        if t.encoding not in ENCODINGS:
            raise ValueError(f"tensor '{name}': unknown encoding {t.encoding!r}")
        blobs = [_np(p) for p in t.parts]
        entries.append({"name": name, "enc": t.encoding, "shape": list(t.shape),
                        "dtype": t.dtype, "parts": [[str(p.dtype), int(p.size)] for p in t.parts],
                        "scale": t.scale})
        payload.extend(blobs)
    header = json.dumps({**message.header, "tensors": entries}, separators=(",", ":"),
                        allow_nan=False).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload)


def decode(blob: bytes) -> Message:
    if blob[:4] != MAGIC:
        raise ValueError("not a fedrecon message (bad magic bytes)")
    (n,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + n].decode())
    offset = 8 + n
    tensors = {}
    for entry in header.pop("tensors"):
        parts = []
        for dtype, size in entry["parts"]:
            dt = np.dtype(dtype).newbyteorder("<")
            nbytes = dt.itemsize * size
            parts.append(np.frombuffer(blob, dtype=dt, count=size, offset=offset).astype(dtype))
            offset += nbytes
        tensors[entry["name"]] = EncodedTensor(entry["enc"], tuple(entry["shape"]), entry["dtype"],
                                               parts, entry["scale"])
    if offset != len(blob):
        raise ValueError(f"message has {len(blob) - offset} trailing bytes")
    return Message(header, tensors)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in message")
    return dtype


def dense(t: Tensor) -> EncodedTensor:
    """``t`` as it is (numpy has no bfloat16: such tensors go as float32)."""
    t = t.detach().cpu()
    arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return EncodedTensor("dense", tuple(t.shape), str(t.dtype).removeprefix("torch."), [arr])
