"""Leakage audit: the gradient-inversion attack recovers image structure from a plain
update of the shared prior, and much less from a DP-noised one; the `audit` subcommand."""

from __future__ import annotations

import argparse

import pytest
import torch
from fedrecon.datasets import (
    CTAcquisition,
    CTSliceDataset,
    collate_ct_samples,
    write_phantom_volumes,
)
from torch.utils.data import DataLoader

from fedrecon.models import ModelConfig, build_model
from fedrecon.privacy.audit import AttackConfig, audit_leakage, register


def _setup(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_iter=2, chans=4, num_pools=1), complex_images=False)
    with torch.no_grad():  # mid-training weights (the prior's output layer starts at zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    acq = CTAcquisition(geometry="parallel", n_views=16, image_size=(16, 16), pixel_spacing=25.0,
                        det_spacing=25.0, photons=1e5)
    files = write_phantom_volumes(tmp_path, n_volumes=1, n_slices=1, image_size=16, seed=0)
    batch = next(iter(DataLoader(CTSliceDataset(files, acq, seed=0), batch_size=1,
                                 collate_fn=collate_ct_samples)))
    return model, batch


@pytest.mark.slow  # ~20-40 s on 2 busy cores: 500 double-backward passes
def test_attack_leaks_structure_without_dp_and_less_with_it(tmp_path):
    model, batch = _setup(tmp_path)
    rows = audit_leakage(model, batch, noise_multipliers=[1.0],
                         attack=AttackConfig(iterations=250))
    plain, dp = rows
    assert plain.setting == "none" and dp.setting == "dp z=1"
    assert plain.update_match > 0.8 and dp.update_match < 0.3
    assert plain.ssim > plain.guess_ssim + 0.15  # structure recovered from the update alone
    assert dp.ssim < plain.ssim - 0.1


def test_audit_arguments_are_checked(tmp_path):
    model, batch = _setup(tmp_path)
    with pytest.raises(ValueError, match="local_steps"):
        audit_leakage(model, batch, local_steps=[0])
    with pytest.raises(ValueError, match="clip_norm"):
        audit_leakage(model, batch, clip_norm=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        AttackConfig(iterations=0)


def test_audit_subcommand_writes_table_json_and_figure(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fedrecon")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "--iterations", "3", "--noise-multipliers", "1",
                              "--secagg-sites", "2", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| none | 1 |" in out and "dp z=1" in out and "secagg n=2" in out
    for name in ("audit.md", "audit.json", "audit.png"):
        assert (tmp_path / "out" / name).is_file()
