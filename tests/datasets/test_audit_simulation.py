"""Audit of the site simulation: reproducible across processes, thread counts and site order;
site names and data keys that would misplace or break files are config errors naming the
key; a failed simulation leaves no half-made data behind."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedrecon.datasets import ConfigError, DataSource, SiteSpec, load_site_specs, simulate_sites

from fedrecon.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:anatomy:RuntimeWarning")

TINY = DataSource(n_volumes=3, n_slices=1, image_size=16)

SITES = {
    "north": '[[sites]]\nname = "north"\nmodality = "mri"\nsplit = [0.6, 0.2, 0.2]\n'
             '[sites.data]\nkind = "synthetic"\nn_volumes = 3\nn_slices = 1\nimage_size = 16\n'
             '[sites.acquisition]\nmask_type = "equispaced_fraction"\nacceleration = 4.0\n'
             'n_coils = 3\n',
    "south": '[[sites]]\nname = "south"\nmodality = "ct"\nsplit = [0.6, 0.2, 0.2]\n'
             '[sites.data]\nkind = "synthetic"\nn_volumes = 3\nn_slices = 1\nimage_size = 16\n'
             '[sites.acquisition]\nn_views = 12\nphotons = 1e4\nimage_size = [16, 16]\n'
             'pixel_spacing = 13.75\ndet_spacing = 13.75\n',
}


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_simulate_data_is_bitwise_reproducible_across_processes_threads_and_site_order(tmp_path):
    """Two processes (other hash seeds, torch thread counts and site order) running
    ``fedrecon simulate-data`` on an MRI and a CT config write the same volume files, byte
    for byte (sites.toml aside: its order follows the config's)."""
    mri = [SITES["north"], SITES["north"].replace('"north"', '"east"').replace(
        '"equispaced_fraction"', '"poisson"\ncalib_size = 4')]
    ct = [SITES["south"], SITES["south"].replace('"south"', '"west"').replace(
        "photons = 1e4", "photons = 1e3")]
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from fedrecon.cli import main; "
            "sys.exit(max(main(['--quiet', 'simulate-data', '--config', c, '--out', o])"
            " for c, o in zip(sys.argv[2::2], sys.argv[3::2])))")
    outs = []
    for k, (hash_seed, threads, order) in enumerate([("0", "1", 1), ("4242", "2", -1)]):
        args = []
        for modality, sites in (("mri", mri), ("ct", ct)):
            cfg = tmp_path / f"{modality}{k}.toml"
            cfg.write_text("seed = 3\n" + "".join(sites[::order]))
            args += [str(cfg), str(tmp_path / f"out{k}")]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", code, threads, *args], env=env, check=True,
                       capture_output=True)
        outs.append({k: v for k, v in _hashes(tmp_path / f"out{k}").items()
                     if k != "sites.toml"})
    assert len(outs[0]) == 12 and outs[0] == outs[1]


@pytest.mark.parametrize("name", ["../outside", "a/b", "a\\b", ".", ".."])
def test_site_name_that_is_not_a_folder_name_is_refused(tmp_path, name):
    """The name is the site's folder under the data root (and its files' prefix): '../x'
    used to write the volumes outside the root, 'a/b' into a nested folder."""
    with pytest.raises(ConfigError, match="'name'"):
        SiteSpec(name, data=TINY)
    path = tmp_path / "sites.toml"
    path.write_text(f"[[sites]]\nname = '{name}'\n")
    with pytest.raises(ConfigError, match="'name'") as info:
        load_site_specs(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("z_range", [(0.9, 0.1), (0.0, 1.5), (-0.2, 0.5), (0.4, 0.4),
                                     (float("nan"), 0.5)])
def test_bad_z_range_is_a_config_error_naming_the_key(tmp_path, z_range):
    """It used to pass the spec and fail mid-simulation with anatomy's ValueError (a
    traceback from the CLI, naming neither the file nor the site)."""
    with pytest.raises(ConfigError, match="z_range"):
        DataSource(z_range=z_range)
    path = tmp_path / "sites.toml"
    lo, hi = ("nan" if math.isnan(v) else v for v in z_range)
    path.write_text(f'[[sites]]\nname = "site_a"\n[sites.data]\nz_range = [{lo}, {hi}]\n')
    with pytest.raises(ConfigError, match="z_range") as info:
        load_site_specs(path)
    assert "site_a" in str(info.value) and str(path) in str(info.value)


def test_split_that_cannot_be_filled_fails_before_any_volume_is_written(tmp_path):
    """2 volumes cannot fill 3 splits: the error used to come after the earlier sites and
    this one had been simulated, leaving their files under the root."""
    ok = SiteSpec("a", data=TINY)
    bad = SiteSpec("b", data=DataSource(n_volumes=2, n_slices=1, image_size=16))
    with pytest.raises(ConfigError, match="site 'b'.*cannot fill 3"):
        simulate_sites([ok, bad], seed=0, root=tmp_path / "root")
    assert not list((tmp_path / "root").rglob("*.h5"))


def test_failed_simulate_data_leaves_an_existing_out_folder_as_it_was(tmp_path, monkeypatch,
                                                                      capsys):
    """A failure in a later site used to leave the earlier sites' folders in an existing
    --out (and files in a site folder that was there empty), so that the rerun refused them
    as 'exists and is not empty'."""
    from fedrecon.datasets import synthetic

    real = synthetic.make_synthetic_fastmri

    def failing(out_dir, *args, **kwargs):
        if Path(out_dir).name == "south":
            raise ConfigError("simulated failure in site 'south'")
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(synthetic, "make_synthetic_fastmri", failing)
    cfg = tmp_path / "c.toml"
    south = SITES["north"].replace('"north"', '"south"')
    cfg.write_text("seed = 0\n" + SITES["north"] + south)
    out = tmp_path / "data"
    (out / "north").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    assert main(["--quiet", "simulate-data", "--config", str(cfg), "--out", str(out)]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["keep.txt", "north"]
    monkeypatch.setattr(synthetic, "make_synthetic_fastmri", real)
    assert main(["--quiet", "simulate-data", "--config", str(cfg), "--out", str(out)]) == 0
    assert len(list(out.rglob("*.h5"))) == 6
