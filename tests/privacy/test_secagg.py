"""Secure aggregation: Shamir sharing, exact sums with and without dropouts (against the
plain float64 sum), masked inputs that look uniform and uncorrelated with the plain input,
and the negative cases (too many dropouts, tampered shares, contradicting requests)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrecon.privacy import SecAggConfig, SecureAggregationError, secure_sum
from fedrecon.privacy.secagg import SecAggClient, SecAggServer, UnmaskRequest, quantize
from fedrecon.privacy.shamir import PRIME, combine_shares, split_secret

CFG = SecAggConfig()


def _vectors(n: int, d: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"s{i}": rng.normal(scale=0.01, size=d) for i in range(n)}


def test_shamir_threshold_recovers_and_fewer_do_not():
    secret = 0xDEADBEEF << 200
    shares = split_secret(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    assert combine_shares(shares[:3]) == secret
    assert combine_shares([shares[4], shares[1], shares[2]]) == secret
    assert combine_shares(shares[:2]) != secret
    with pytest.raises(ValueError, match="threshold"):
        split_secret(secret, threshold=6, xs=[1, 2, 3])
    with pytest.raises(ValueError, match="secret"):
        split_secret(PRIME, threshold=2, xs=[1, 2])


@pytest.mark.parametrize("stage", [None, "after_sharing", "after_masking"])
def test_sum_equals_plain_sum_within_quantization_bound(stage):
    vs = _vectors(4)
    kw = {} if stage is None else {f"drop_{stage}": ["s2"]}
    res = secure_sum(vs, round=3, config=CFG, **kw)
    included = [k for k in vs if not (stage == "after_sharing" and k == "s2")]
    assert res.survivors == included
    assert res.dropped == (["s2"] if stage == "after_sharing" else [])
    plain = np.sum([vs[k] for k in included], axis=0)  # the independent reference
    err = np.abs(res.total - plain).max()
    assert err <= CFG.sum_error_bound(len(included))
    assert err > 0  # it is quantized, not passed through


def test_weighted_mean_matches_fedavg_within_stated_error():
    vs = _vectors(3)
    weights = {"s0": 2.0, "s1": 5.0, "s2": 1.0}
    pre = {k: np.concatenate([weights[k] * v, [weights[k]]]) for k, v in vs.items()}
    res = secure_sum(pre, round=0, config=CFG)
    mean = res.total[:-1] / res.total[-1]
    fedavg = sum(weights[k] * vs[k] for k in vs) / sum(weights.values())
    # error <= n 2^-(f+1) / W on the numerator plus the same relative error on W
    assert np.abs(mean - fedavg).max() <= 2 * CFG.sum_error_bound(3) / 8.0


def test_masked_input_is_unrelated_to_the_plain_input():
    vs = _vectors(3, d=20000)
    vs["s0"] = np.linspace(-1, 1, 20000)  # a strongly structured plain input
    res = secure_sum(vs, round=0, config=CFG)
    y = res.view.masked["s0"]
    q = quantize(vs["s0"], CFG)[0]
    # residues look uniform on Z_2^64: top byte histogram passes a chi-square test
    counts = np.bincount((y >> np.uint64(56)).astype(np.int64), minlength=256)
    chi2 = float(((counts - len(y) / 256) ** 2 / (len(y) / 256)).sum())
    assert chi2 < 255 + 5 * np.sqrt(2 * 255)  # mean 255, sd sqrt(510)
    # and carry no linear trace of the plain input (|r| ~ 1/sqrt(d) = 0.007)
    yf = (y >> np.uint64(11)).astype(np.float64)
    assert abs(np.corrcoef(yf, vs["s0"])[0, 1]) < 0.03
    assert abs(np.corrcoef(yf, q.view(np.int64).astype(np.float64))[0, 1]) < 0.03
    # every message the server got: keys, encrypted shares, masked vectors, unmask shares
    assert set(res.view.masked) == set(vs)
    for sid, masked in res.view.masked.items():
        assert not np.array_equal(masked, quantize(vs[sid], CFG)[0])


def test_too_many_dropouts_abandon_the_round():
    vs = _vectors(4)  # threshold 3
    with pytest.raises(SecureAggregationError, match="too many sites dropped"):
        secure_sum(vs, round=0, config=CFG, drop_after_sharing=["s0", "s1"])
    with pytest.raises(SecureAggregationError, match="dropped out to unmask"):
        secure_sum(vs, round=0, config=CFG, drop_after_sharing=["s0"], drop_after_masking=["s1"])
    with pytest.raises(SecureAggregationError, match="at least 2 sites"):
        secure_sum(_vectors(1), round=0, config=CFG)


def _setup(n: int = 5):
    vs = _vectors(n)
    clients = {k: SecAggClient(k, 0, v, CFG) for k, v in vs.items()}
    server = SecAggServer(0, CFG, 2000)
    roster, t = server.receive_keys([c.advertise() for c in clients.values()])
    routed = server.route_shares([s for c in clients.values() for s in c.share_keys(roster, t)])
    return vs, clients, server, routed


def test_share_tampered_in_transit_fails_authentication():
    _, clients, _, routed = _setup()
    bad = routed["s1"][0]
    routed["s1"][0] = dataclasses.replace(bad, ciphertext=bytes([bad.ciphertext[0] ^ 1]) + bad.ciphertext[1:])
    with pytest.raises(SecureAggregationError, match="failed authentication"):
        clients["s1"].receive_shares(routed["s1"])


def test_tampered_unmask_share_is_outvoted_or_abandons_the_round():
    vs, clients, server, routed = _setup(5)  # threshold 3
    for k, c in clients.items():
        c.receive_shares(routed[k])
    request = server.receive_masked({k: c.masked_input() for k, c in clients.items()})
    responses = [c.unmask(request) for c in clients.values()]
    x, y = responses[0].seed_shares["s3"]
    responses[0].seed_shares["s3"] = (x, (y + 1) % PRIME)
    total = server.finish(responses)  # 4 honest shares left: a good subset is found
    ref = np.sum(list(vs.values()), axis=0)
    assert np.abs(total.view(np.int64) / 2.0**CFG.frac_bits - ref).max() <= CFG.sum_error_bound(5)

    vs, clients, server, routed = _setup(5)
    for k, c in clients.items():
        c.receive_shares(routed[k])
    request = server.receive_masked({k: c.masked_input() for k, c in clients.items()})
    responses = [c.unmask(request) for c in list(clients.values())[:3]]  # exactly threshold
    x, y = responses[0].seed_shares["s3"]
    responses[0].seed_shares["s3"] = (x, (y + 1) % PRIME)
    with pytest.raises(SecureAggregationError, match="commitment"):
        server.finish(responses)


def test_client_refuses_to_reveal_seed_and_key_of_one_site():
    _, clients, _, routed = _setup(4)
    for k, c in clients.items():
        c.receive_shares(routed[k])
    with pytest.raises(SecureAggregationError, match="both"):
        clients["s0"].unmask(UnmaskRequest(("s0", "s1", "s2"), ("s2",)))
    clients["s0"].unmask(UnmaskRequest(("s0", "s1", "s2"), ("s3",)))
    with pytest.raises(SecureAggregationError, match="contradicts"):
        clients["s0"].unmask(UnmaskRequest(("s0", "s1", "s3"), ("s2",)))


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="threshold"):
        SecAggConfig(threshold=1)
    with pytest.raises(ValueError, match="frac_bits"):
        SecAggConfig(frac_bits=60)
    with pytest.raises(ValueError, match="overflows"):
        SecAggConfig(frac_bits=52, clip_range=2.0**16).threshold_for(4)
    with pytest.raises(ValueError, match="drop_after_sharing"):
        secure_sum(_vectors(3), round=0, config=CFG, drop_after_sharing=["zz"])
    with pytest.raises(ValueError, match="NaN"):
        secure_sum({"a": np.array([np.nan, 1.0]), "b": np.zeros(2)}, round=0, config=CFG)
