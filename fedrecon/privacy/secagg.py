"""Pairwise-mask secure aggregation with dropout recovery (SecAgg).

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (the semi-honest
protocol, Fig. 4, with authenticated share transport and commitments to the secrets).

One round, four steps, every message through the server:

0. **advertise** -- each client makes two X25519 key pairs (``c`` encrypts shares, ``s``
   derives pairwise masks) and a commitment ``SHA-256(round, b)`` to a fresh 32-byte
   self-mask seed ``b``.
1. **share keys** -- each client splits ``s_sk`` and ``b`` into ``threshold``-of-``n`` Shamir
   shares (:mod:`.shamir`) and sends peer ``v``'s share encrypted and authenticated
   (ChaCha20-Poly1305 under HKDF(X25519(c_u, c_v))): the server relays but cannot read
   them, and a tampered share fails authentication at its recipient.
2. **masked input** -- ``y_u = q(x_u) + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)
   (mod 2^64)`` over the peers ``v`` that completed step 1 (``s_uv`` = HKDF(X25519(s_u, s_v))).
   ``PRG`` is AES-256-CTR; ``q`` is fixed-point quantization (:class:`SecAggConfig`).
3. **unmask** -- the server names the survivors (sent ``y``) and the dropped (shared keys,
   sent no ``y``); each survivor returns its shares of ``b`` of the survivors and of
   ``s_sk`` of the dropped -- never both for one client. The server recovers them (each
   checked against the commitment / advertised public key), removes the self-masks and the
   dropped clients' dangling pair masks, and learns ``sum_u q(x_u)`` and nothing else.

Fewer than ``threshold`` survivors, or shares that cannot be made to match their
commitment, abandon the round with :class:`SecureAggregationError`: never a wrong sum.
What the server sees is recorded in :class:`ServerView` (the tests check it).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .shamir import Share, combine_shares, int_to_secret, secret_to_int, split_secret

__all__ = [
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "SecureAggregationError",
    "SecureSum",
    "ServerView",
    "dequantize",
    "quantize",
    "secure_sum",
]

_Y_BYTES = 66  # a GF(2^521 - 1) element


class SecureAggregationError(RuntimeError):
    """The round cannot be unmasked correctly (too many dropouts, tampered shares, a
    protocol violation); it is abandoned."""


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings.

    Quantization: a value is clipped to ``[-clip_range, clip_range]`` and rounded to the
    nearest multiple of ``2^-frac_bits``; sums live in Z_{2^64} as two's complement. The
    rounding error is at most ``2^-(frac_bits+1)`` per value, so a sum of ``n`` inputs is
    off by at most ``n 2^-(frac_bits+1)`` per coordinate (:meth:`sum_error_bound`); values
    beyond ``clip_range`` are clipped (and counted). No overflow while
    ``n * clip_range * 2^frac_bits < 2^63`` (checked).

    Parameters
    ----------
    threshold
        Shares needed to recover a secret: an int (count) or ``None`` for
        ``max(2, n // 2 + 1)`` of the round's ``n`` clients. Also the fewest survivors
        that can be unmasked.
    frac_bits, clip_range
        Fixed-point format (see above).
    """

    threshold: int | None = None
    frac_bits: int = 32
    clip_range: float = 2.0**16

    def __post_init__(self) -> None:
        if self.threshold is not None and self.threshold < 2:
            raise ValueError(f"SecAggConfig: 'threshold' must be >= 2 (one share would reveal "
                             f"the secret to anyone); got {self.threshold}")
        if not 0 <= self.frac_bits <= 52:
            raise ValueError(f"SecAggConfig: 'frac_bits' must lie in [0, 52]; got {self.frac_bits}")
        if not self.clip_range > 0:
            raise ValueError(f"SecAggConfig: 'clip_range' must be > 0; got {self.clip_range}")

    def threshold_for(self, n: int) -> int:
        t = max(2, n // 2 + 1) if self.threshold is None else self.threshold
        if n < 2:
            raise SecureAggregationError(f"secure aggregation needs at least 2 sites in a round; "
                                         f"got {n} (a sum of one input is that input)")
        if t > n:
            raise SecureAggregationError(f"secure aggregation: threshold {t} exceeds the "
                                         f"round's {n} sites")
        if n * self.clip_range * 2.0**self.frac_bits >= 2.0**63:
            raise ValueError(f"SecAggConfig: {n} sites x clip_range {self.clip_range} x "
                             f"2^{self.frac_bits} overflows 2^63; lower 'frac_bits' or "
                             f"'clip_range'")
        return t

    def sum_error_bound(self, n: int) -> float:
        """Largest quantization error of one coordinate of a sum of ``n`` unclipped inputs."""
        return n * 2.0 ** -(self.frac_bits + 1)


def quantize(x: np.ndarray, config: SecAggConfig) -> tuple[np.ndarray, int]:
    """``(uint64 residues, number of clipped values)`` of a float vector."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("quantize: the input has NaN/Inf")
    clipped = int(np.count_nonzero(np.abs(x) > config.clip_range))
    x = np.clip(x, -config.clip_range, config.clip_range)
    q = np.rint(x * 2.0**config.frac_bits).astype(np.int64)
    return q.view(np.uint64), clipped


def dequantize(total: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """A sum of quantized inputs (uint64 residues) back to float64."""
    return total.view(np.int64).astype(np.float64) / 2.0**config.frac_bits


def _prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 from a 32-byte seed (AES-256-CTR keystream)."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * length)) + enc.finalize(), dtype=np.uint64).copy()


def _kdf(secret: bytes, purpose: str, round: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"fedrecon/secagg/{purpose}/{round}".encode()).derive(secret)


def _commit(round: int, seed: bytes) -> bytes:
    return hashlib.sha256(f"fedrecon/secagg/seed/{round}/".encode() + seed).digest()


def _pair_sign(u: str, v: str) -> int:
    return 1 if u < v else -1


def _pair_mask(own: X25519PrivateKey, peer_public: bytes, round: int, length: int) -> np.ndarray:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _prg(_kdf(shared, "mask", round), length)


# -- messages ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertisedKeys:
    site_id: str
    enc_public: bytes
    mask_public: bytes
    seed_commitment: bytes


@dataclass(frozen=True)
class EncryptedShare:
    sender: str
    recipient: str
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    sender: str
    seed_shares: dict[str, Share]
    key_shares: dict[str, Share]


# -- client -----------------------------------------------------------------------------
class SecAggClient:
    """One site's side of a round; holds its plain vector, which never leaves it."""

    def __init__(self, site_id: str, round: int, vector: np.ndarray, config: SecAggConfig) -> None:
        self.site_id = site_id
        self.round = round
        self.config = config
        self._q, self.clipped = quantize(vector, config)
        self._enc = X25519PrivateKey.generate()
        self._mask = X25519PrivateKey.generate()
        self._seed = os.urandom(32)
        self._roster: dict[str, AdvertisedKeys] = {}
        self._held: dict[str, tuple[Share, Share]] = {}  # peer -> (share of s_sk, share of b)
        self._revealed_seed: set[str] = set()
        self._revealed_key: set[str] = set()

    def advertise(self) -> AdvertisedKeys:
        raw = lambda k: k.public_key().public_bytes_raw()
        return AdvertisedKeys(self.site_id, raw(self._enc), raw(self._mask),
                              _commit(self.round, self._seed))

    def _channel(self, peer: str) -> ChaCha20Poly1305:
        shared = self._enc.exchange(X25519PublicKey.from_public_bytes(self._roster[peer].enc_public))
        return ChaCha20Poly1305(_kdf(shared, "share", self.round))

    def _aad(self, sender: str, recipient: str) -> bytes:
        return f"{self.round}|{sender}|{recipient}".encode()

    def share_keys(self, roster: Mapping[str, AdvertisedKeys], threshold: int) -> list[EncryptedShare]:
        if self.site_id not in roster:
            raise SecureAggregationError(f"site '{self.site_id}': not in the round's roster")
        if len({k.mask_public for k in roster.values()}) != len(roster) or \
                len({k.enc_public for k in roster.values()}) != len(roster):
            raise SecureAggregationError(f"site '{self.site_id}': the roster repeats public keys")
        if not 2 <= threshold <= len(roster):
            raise SecureAggregationError(f"site '{self.site_id}': threshold {threshold} invalid "
                                         f"for {len(roster)} sites")
        self._roster = dict(roster)
        self.threshold = threshold
        ids = sorted(roster)
        xs = [ids.index(p) + 1 for p in ids]
        key_shares = split_secret(secret_to_int(self._mask.private_bytes_raw()), threshold=threshold, xs=xs)
        seed_shares = split_secret(secret_to_int(self._seed), threshold=threshold, xs=xs)
        out = []
        for peer, (x, ys), (_, yb) in zip(ids, key_shares, seed_shares):
            payload = x.to_bytes(4, "big") + ys.to_bytes(_Y_BYTES, "big") + yb.to_bytes(_Y_BYTES, "big")
            nonce = os.urandom(12)
            ct = self._channel(peer).encrypt(nonce, payload, self._aad(self.site_id, peer))
            out.append(EncryptedShare(self.site_id, peer, nonce, ct))
        return out

    def receive_shares(self, shares: Sequence[EncryptedShare]) -> None:
        for s in shares:
            if s.recipient != self.site_id or s.sender not in self._roster:
                raise SecureAggregationError(f"site '{self.site_id}': got a share addressed "
                                             f"{s.sender} -> {s.recipient}")
            try:
                payload = self._channel(s.sender).decrypt(s.nonce, s.ciphertext,
                                                          self._aad(s.sender, self.site_id))
            except InvalidTag:
                raise SecureAggregationError(
                    f"round {self.round}: the share from site '{s.sender}' to site "
                    f"'{self.site_id}' failed authentication (tampered in transit); round "
                    f"abandoned") from None
            x = int.from_bytes(payload[:4], "big")
            ys = int.from_bytes(payload[4:4 + _Y_BYTES], "big")
            yb = int.from_bytes(payload[4 + _Y_BYTES:], "big")
            self._held[s.sender] = ((x, ys), (x, yb))

    def masked_input(self) -> np.ndarray:
        """``q(x) + PRG(b) + signed pair masks (mod 2^64)`` over the peers that shared keys."""
        n = self._q.size
        y = self._q + _prg(self._seed, n)
        for peer in self._held:
            if peer == self.site_id:
                continue
            mask = _pair_mask(self._mask, self._roster[peer].mask_public, self.round, n)
            y = y + mask if _pair_sign(self.site_id, peer) > 0 else y - mask
        return y

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        surv, drop = set(request.survivors), set(request.dropped)
        if surv & drop:
            raise SecureAggregationError(f"site '{self.site_id}': the server asked for both the "
                                         f"seed and the key of {sorted(surv & drop)}; refused")
        if self.site_id not in surv:
            raise SecureAggregationError(f"site '{self.site_id}': not listed as a survivor")
        if len(surv) < self.threshold:
            raise SecureAggregationError(f"site '{self.site_id}': only {len(surv)} survivors "
                                         f"(< threshold {self.threshold}); refused")
        if (surv & self._revealed_key) or (drop & self._revealed_seed):
            raise SecureAggregationError(f"site '{self.site_id}': a second unmask request "
                                         f"contradicts the first; refused")
        self._revealed_seed |= surv
        self._revealed_key |= drop
        return UnmaskResponse(
            self.site_id,
            seed_shares={u: self._held[u][1] for u in surv if u in self._held},
            key_shares={u: self._held[u][0] for u in drop if u in self._held})


# -- server -----------------------------------------------------------------------------
@dataclass
class ServerView:
    """Everything the server received in one round (for audits and tests)."""

    keys: dict[str, AdvertisedKeys] = field(default_factory=dict)
    shares: list[EncryptedShare] = field(default_factory=list)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    unmask: list[UnmaskResponse] = field(default_factory=list)


def _recover(shares: Sequence[Share], threshold: int, check: Callable[[int], bool],
             what: str, max_tries: int = 256) -> int:
    """A secret from ``threshold``-subsets of ``shares`` that passes ``check`` (a tampered
    share is outvoted when more than ``threshold`` honest shares came in)."""
    if len(shares) < threshold:
        raise SecureAggregationError(f"{what}: {len(shares)} shares, need {threshold} (too many "
                                     f"sites dropped out to unmask); round abandoned")
    for subset in itertools.islice(itertools.combinations(shares, threshold), max_tries):
        value = combine_shares(subset, threshold=threshold)
        if check(value):
            return value
    raise SecureAggregationError(f"{what}: no {threshold} of the {len(shares)} shares match the "
                                 f"commitment (tampered shares); round abandoned")


class SecAggServer:
    """The aggregator: relays messages and learns only the sum of the survivors' inputs."""

    def __init__(self, round: int, config: SecAggConfig, length: int) -> None:
        self.round = round
        self.config = config
        self.length = length
        self.view = ServerView()
        self.threshold = 0
        self._shared: list[str] = []
        self._request: UnmaskRequest | None = None

    def receive_keys(self, keys: Sequence[AdvertisedKeys]) -> tuple[dict[str, AdvertisedKeys], int]:
        """The roster to broadcast and the threshold."""
        self.view.keys = {k.site_id: k for k in keys}
        if len(self.view.keys) != len(keys):
            raise SecureAggregationError("two clients advertised under one site id")
        self.threshold = self.config.threshold_for(len(keys))
        return dict(self.view.keys), self.threshold

    def route_shares(self, shares: Sequence[EncryptedShare]) -> dict[str, list[EncryptedShare]]:
        self.view.shares = list(shares)
        self._shared = sorted({s.sender for s in shares})
        if len(self._shared) < self.threshold:
            raise SecureAggregationError(f"round {self.round}: {len(self._shared)} sites shared "
                                         f"keys, need {self.threshold}; round abandoned")
        routed: dict[str, list[EncryptedShare]] = {}
        for s in shares:
            routed.setdefault(s.recipient, []).append(s)
        return routed

    def receive_masked(self, masked: Mapping[str, np.ndarray]) -> UnmaskRequest:
        unknown = sorted(set(masked) - set(self._shared))
        if unknown:
            raise SecureAggregationError(f"masked inputs from sites that did not share keys: {unknown}")
        for sid, y in masked.items():
            if y.dtype != np.uint64 or y.shape != (self.length,):
                raise SecureAggregationError(f"site '{sid}': masked input must be uint64 of "
                                             f"length {self.length}")
        self.view.masked = dict(masked)
        survivors = tuple(sorted(masked))
        if len(survivors) < self.threshold:
            raise SecureAggregationError(f"round {self.round}: {len(survivors)} masked inputs, "
                                         f"need {self.threshold} (too many sites dropped out); "
                                         f"round abandoned")
        self._request = UnmaskRequest(survivors, tuple(s for s in self._shared if s not in masked))
        return self._request

    def finish(self, responses: Sequence[UnmaskResponse]) -> np.ndarray:
        """The sum of the survivors' quantized inputs (uint64 residues)."""
        assert self._request is not None, "receive_masked first"
        self.view.unmask = list(responses)
        req = self._request
        total = np.zeros(self.length, dtype=np.uint64)
        for y in self.view.masked.values():
            total += y
        for u in req.survivors:
            commitment = self.view.keys[u].seed_commitment

            def seed_ok(v: int, c: bytes = commitment) -> bool:
                return v < 1 << 256 and _commit(self.round, int_to_secret(v)) == c

            seed = _recover([r.seed_shares[u] for r in responses if u in r.seed_shares],
                            self.threshold, seed_ok, f"self-mask seed of site '{u}'")
            total -= _prg(int_to_secret(seed), self.length)
        for u in req.dropped:
            public = self.view.keys[u].mask_public

            def key_ok(v: int, p: bytes = public) -> bool:
                return v < 1 << 256 and X25519PrivateKey.from_private_bytes(
                    int_to_secret(v)).public_key().public_bytes_raw() == p

            key = X25519PrivateKey.from_private_bytes(int_to_secret(_recover(
                [r.key_shares[u] for r in responses if u in r.key_shares], self.threshold,
                key_ok, f"masking key of dropped site '{u}'")))
            for v in req.survivors:  # v added sign(v, u) * PRG(s_vu): take it out
                mask = _pair_mask(key, self.view.keys[v].mask_public, self.round, self.length)
                total = total - mask if _pair_sign(v, u) > 0 else total + mask
        return total


# -- driver -----------------------------------------------------------------------------
@dataclass
class SecureSum:
    """Result of :func:`secure_sum`."""

    total: np.ndarray  # float64: sum of the survivors' (quantized) inputs
    survivors: list[str]
    dropped: list[str]
    clipped: int  # values beyond clip_range, over all survivors
    view: ServerView


def secure_sum(vectors: Mapping[str, np.ndarray], *, round: int, config: SecAggConfig,
               drop_after_sharing: Sequence[str] = (),
               drop_after_masking: Sequence[str] = ()) -> SecureSum:
    """Run one protocol round in-process: every client holds its vector, the server only
    the messages. ``drop_after_sharing``: clients that share keys and then vanish (their
    dangling pair masks are recovered); ``drop_after_masking``: clients that send a masked
    input and vanish before unmasking (their input counts, their seed is recovered)."""
    for name, group in (("drop_after_sharing", drop_after_sharing),
                        ("drop_after_masking", drop_after_masking)):
        unknown = sorted(set(group) - set(vectors))
        if unknown:
            raise ValueError(f"argument '{name}' names unknown sites: {unknown}")
    lengths = {np.asarray(v).size for v in vectors.values()}
    if len(lengths) != 1:
        raise ValueError(f"secure_sum: vectors of different lengths {sorted(lengths)}")
    clients = {sid: SecAggClient(sid, round, np.asarray(v).reshape(-1), config)
               for sid, v in vectors.items()}
    server = SecAggServer(round, config, lengths.pop())
    roster, threshold = server.receive_keys([c.advertise() for c in clients.values()])
    routed = server.route_shares([s for c in clients.values() for s in c.share_keys(roster, threshold)])
    for sid, c in clients.items():
        c.receive_shares(routed.get(sid, []))
    gone = set(drop_after_sharing)
    request = server.receive_masked({sid: c.masked_input() for sid, c in clients.items()
                                     if sid not in gone})
    gone |= set(drop_after_masking)
    responses = [clients[s].unmask(request) for s in request.survivors if s not in gone]
    total = server.finish(responses)
    return SecureSum(dequantize(total, config), list(request.survivors), list(request.dropped),
                     sum(clients[s].clipped for s in request.survivors), server.view)
