"""MRI acquisitions that cannot work on the site's k-space fail before the run starts: a
one-line ConfigError naming the config file, the site and the key (with what would work),
exit status 2 from ``fedrecon train`` and no run folder left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedrecon.datasets.synthetic import make_synthetic_fastmri

from fedrecon.cli import main
from fedrecon.experiment import build_experiment, load_config

HEAD = "seed = 0\nrounds = 1\nlocal_steps = 1\nbatch_size = 1\n[model]\nn_iter = 1\nchans = 4\n" \
       "num_pools = 1\n"


def _synthetic(image_size: int, acquisition: str, name: str = "north") -> str:
    return (f'[[sites]]\nname = "{name}"\nmodality = "mri"\nsplit = [0.5, 0.5, 0.0]\n'
            f'[sites.data]\nkind = "synthetic"\nn_volumes = 2\nn_slices = 1\n'
            f"image_size = {image_size}\n[sites.acquisition]\nn_coils = 2\n{acquisition}\n")


def _train_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                 key: str, site: str = "north") -> str:
    cfg = tmp_path / "run.toml"
    cfg.write_text(HEAD + text)
    out = tmp_path / "run"
    code = main(["--quiet", "train", "--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(cfg) in lines[0] and repr(site) in lines[0] and f"'{key}'" in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not (tmp_path / "run" / "data").exists()
    return lines[0]


def test_calib_size_too_large_for_the_image(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, _synthetic(
        16, 'mask = "poisson"\nacceleration = 4.0\ncalib_size = 12'), "calib_size")
    assert "calib_size <=" in line


def test_equispaced_fraction_acceleration_too_high_for_narrow_image(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, _synthetic(
        16, 'mask = "equispaced_fraction"\nacceleration = 20.0\ncenter_fraction = 0.08'),
        "acceleration")
    assert "acceleration <=" in line


def test_centre_too_narrow_for_espirit(tmp_path, capsys):
    line = _train_fails(tmp_path, capsys, _synthetic(
        46, 'mask = "random"\nacceleration = 4.0\ncenter_fraction = 0.08'), "center_fraction")
    assert "center_fraction >= 0.131" in line


def test_centre_too_narrow_for_espirit_in_folder_site(tmp_path, capsys):
    """Folder sites: the width comes from the files, checked in build_experiment."""
    for split in ("train", "val"):
        make_synthetic_fastmri(tmp_path / "data" / split, n_volumes=1, n_coils=2,
                               image_size=46, n_slices=1, seed=1 if split == "val" else 0,
                               name_prefix=f"{split}_")
    text = ('[[sites]]\nname = "south"\nmodality = "mri"\ntrain = "data/train"\n'
            'val = "data/val"\n[sites.acquisition]\nmask = "random"\nacceleration = 4.0\n'
            "center_fraction = 0.08\n")
    line = _train_fails(tmp_path, capsys, text, "center_fraction", site="south")
    assert "center_fraction >=" in line
    assert (tmp_path / "data" / "train").is_dir()  # the user's data is left alone


def test_borderline_settings_still_build(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(HEAD + _synthetic(46, 'mask = "random"\nacceleration = 4.0\n'
                                         "center_fraction = 0.131", "a")
                   + _synthetic(16, 'mask = "equispaced_fraction"\nacceleration = 2.0\n'
                                    "center_fraction = 0.375", "b"))
    exp = build_experiment(load_config(cfg))
    sample = exp.sites[0].train_loader.dataset[0]
    assert sample.num_low_frequencies == 6 and sample.coil_maps is not None
