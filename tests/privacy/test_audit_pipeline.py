"""Regression tests of the privacy audit (config, leakage audit, its command line): each
checks a number or a refusal against a reference written here, not against the code."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedrecon.privacy import PrivacyConfig, PrivacyConfigError
from fedrecon.privacy.audit import AttackConfig, audit_leakage, invert_update, register

torch.set_num_threads(1)


# -- [privacy] tables: wrong types and non-finite numbers are refused by key ---------------
@pytest.mark.parametrize("table,key,expected", [
    ({"validation": {"norm_rule": "false"}}, r"validation\.norm_rule", "true/false"),
    ({"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "adaptive_clip": "yes"}},
     r"dp\.adaptive_clip", "true/false"),
    ({"dp": {"clip_norm": 1.0, "noise_multiplier": True}}, r"dp\.noise_multiplier", "number"),
    ({"dp": {"clip_norm": "1.0", "noise_multiplier": 1.0}}, r"dp\.clip_norm", "number"),
    ({"dp": {"clip_norm": math.inf, "noise_multiplier": 1.0}}, r"dp\.clip_norm", "finite"),
    ({"dp": {"clip_norm": 1.0, "noise_multiplier": math.inf}}, r"dp\.noise_multiplier", "finite"),
    ({"validation": {"mad_threshold": "5"}}, r"validation\.mad_threshold", "number"),
    ({"validation": {"min_updates": 3.5}}, r"validation\.min_updates", "integer"),
    ({"secure_aggregation": {"threshold": 2.5}}, r"secure_aggregation\.threshold", "integer"),
    ({"secure_aggregation": {"frac_bits": "16"}}, r"secure_aggregation\.frac_bits", "integer"),
    ({"secure_aggregation": {"clip_range": math.inf}}, r"secure_aggregation\.clip_range", "finite"),
])
def test_privacy_table_values_of_the_wrong_type_are_refused_by_key(table, key, expected):
    # a TOML string "false" is truthy: before the fix it silently turned the norm rule ON
    with pytest.raises(PrivacyConfigError, match=rf"\[privacy\]\.{key}: expected .*{expected}"):
        PrivacyConfig.from_dict(table)


def test_privacy_table_valid_values_still_parse_and_range_errors_name_the_section():
    cfg = PrivacyConfig.from_dict({"dp": {"clip_norm": 1, "noise_multiplier": 0},  # ints: fine
                                   "validation": {"norm_rule": False, "min_updates": 4}})
    assert cfg.dp.clip_norm == 1 and cfg.validation.norm_rule is False
    assert PrivacyConfig.from_dict({"secure_aggregation": {"threshold": 3}}).secure_aggregation.threshold == 3
    with pytest.raises(PrivacyConfigError, match=r"\[privacy\]\.dp: .*'clip_norm' must be > 0"):
        PrivacyConfig.from_dict({"dp": {"clip_norm": 0.0, "noise_multiplier": 1.0}})
    with pytest.raises(PrivacyConfigError, match=r"\[privacy\]\.validation: .*'min_updates'"):
        PrivacyConfig.from_dict({"validation": {"min_updates": 2}})


# -- the attack reports the match of the image it returns ----------------------------------
class _PixelAffine(nn.Module):
    """``out = w * y + b`` per pixel; with the identity operator ``y = x``."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b), dtype=w.dtype))

    def forward(self, y, op, protocol=None):
        return self.w * y + self.b


def _numpy_update(w: np.ndarray, b: float, x: np.ndarray, lr: float) -> np.ndarray:
    """One SGD step of ``mean((w x + b - x)^2) / max(x)^2`` by hand: ``-lr * gradient``."""
    r = (w - 1.0) * x + b
    n, dr = x.size, x.max()
    grad_w = 2.0 * r * x / (n * dr**2)
    grad_b = 2.0 * r.sum() / (n * dr**2)
    return -lr * np.concatenate([grad_w.ravel(), [grad_b]])


@pytest.mark.parametrize("iterations,restarts", [(1, 1), (3, 2)])
def test_reported_match_is_that_of_the_returned_image(iterations, restarts):
    rng = np.random.default_rng(0)
    h = w_ = 4
    w = 0.5 + rng.random((h, w_))
    b, lr = 0.1, 0.05
    truth = rng.random((1, h, w_)) + 0.2
    observed_np = _numpy_update(w, b, truth, lr)
    observed = {"w": torch.from_numpy(observed_np[:-1].reshape(h, w_)),
                "b": torch.tensor(observed_np[-1])}
    model = _PixelAffine(torch.from_numpy(w), b)
    ident = SimpleNamespace(A=lambda x: x)
    prep = SimpleNamespace(op=ident, y=torch.from_numpy(truth), target=torch.from_numpy(truth),
                           protocol=torch.zeros(1, 1, dtype=torch.float64))
    x, match = invert_update(model, observed, prep, value_range=float(truth.max()), lr=lr,
                             attack=AttackConfig(iterations=iterations, restarts=restarts, lr=0.5))
    sim = _numpy_update(w, b, x.numpy(), lr)
    ref = float(sim @ observed_np / (np.linalg.norm(sim) * np.linalg.norm(observed_np)))
    assert match == pytest.approx(ref, abs=1e-9)


# -- argument checks ----------------------------------------------------------------------
def _ct_batch(tmp_path):
    from fedrecon.datasets import (
        CTAcquisition,
        CTSliceDataset,
        collate_ct_samples,
        write_phantom_volumes,
    )
    from torch.utils.data import DataLoader

    from fedrecon.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_iter=1, chans=2, num_pools=1), complex_images=False)
    acq = CTAcquisition(geometry="parallel", n_views=8, image_size=(8, 8), pixel_spacing=50.0,
                        det_spacing=50.0, photons=1e5)
    files = write_phantom_volumes(tmp_path, n_volumes=1, n_slices=1, image_size=8, seed=0)
    batch = next(iter(DataLoader(CTSliceDataset(files, acq, seed=0), batch_size=1,
                                 collate_fn=collate_ct_samples)))
    return model, batch


@pytest.mark.parametrize("lr", [0.0, -1e-2, math.nan])
def test_audit_refuses_a_site_learning_rate_that_is_not_positive(tmp_path, lr):
    # lr = 0: the site's update is zero, the cosine 0, and a meaningless row was reported
    model, batch = _ct_batch(tmp_path)
    with pytest.raises(ValueError, match="'lr' must be > 0"):
        audit_leakage(model, batch, lr=lr, attack=AttackConfig(iterations=1))
    with pytest.raises(ValueError, match="noise_multipliers"):
        audit_leakage(model, batch, noise_multipliers=[math.nan], attack=AttackConfig(iterations=1))


@pytest.mark.parametrize("argv,option", [
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--size", "6"], "--size"),
    (["--local-steps", "1", "0"], "--local-steps"),
    (["--noise-multipliers", "-1"], "--noise-multipliers"),
    (["--clip-norm", "0"], "--clip-norm"),
])
def test_audit_command_refuses_bad_options_by_name(argv, option):
    parser = argparse.ArgumentParser(prog="fedrecon")
    register(parser.add_subparsers(dest="command"))
    # small and fast even where the option slips through (the unfixed code ran the attack)
    base = ["audit", "--iterations", "1", "--secagg-sites", "1", "--size", "8", "--views", "4",
            "--chans", "2", "--n-iter", "1", "--noise-multipliers"]
    args = parser.parse_args(base + argv)
    with pytest.raises(SystemExit, match=f"argument '{option}'"):
        args.func(args)
