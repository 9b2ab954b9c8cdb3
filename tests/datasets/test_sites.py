"""Federated sites: specs from TOML, volume-disjoint splits, protocol vectors, recipes."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from fedrecon.datasets import (
    ConfigError,
    CTAcquisition,
    CTSliceDataset,
    DataSource,
    FastMRISliceDataset,
    MRIAcquisition,
    SiteSpec,
    acquisition_per_site,
    check_volume_disjoint,
    dataset_per_site,
    dump_site_specs,
    leave_one_site_out,
    load_site_specs,
    make_synthetic_fastmri,
    simulate_sites,
)
from fedrecon.datasets.sites import site_specs_to_toml
from fedrecon.operators import PoissonDiscMask, RandomMask, VariableDensityMask2D

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = DataSource(n_volumes=4, n_slices=2, image_size=32)


# without the MNI152 template the data come from phantoms, with a warning
pytestmark = pytest.mark.filterwarnings("ignore:anatomy:RuntimeWarning")


@pytest.fixture(scope="module")
def mri_sites(tmp_path_factory):
    specs = acquisition_per_site(3, "mri", data=SMALL)
    return simulate_sites(specs, seed=0, root=tmp_path_factory.mktemp("mri"))


def all_samples(site):
    return [ds[i] for ds in (site.train, site.val, site.test) for i in range(len(ds))]


def test_splits_are_volume_disjoint_across_splits_and_sites(mri_sites):
    seen = {}
    for site in mri_sites.values():
        assert {k: len(v) for k, v in site.files.items()} == {"train": 2, "val": 1, "test": 1}
        for split, files in site.files.items():
            ds = getattr(site, split)
            assert isinstance(ds, FastMRISliceDataset)
            assert {s.fname for s in (ds[i] for i in range(len(ds)))} == {f.name for f in files}
            for f in files:
                assert f.resolve() not in seen, f"{f} in {seen.get(f.resolve())} and {split}"
                seen[f.resolve()] = (site.name, split)
    assert len(seen) == 3 * SMALL.n_volumes
    check_volume_disjoint(mri_sites)


def test_a_volume_in_two_sites_is_refused(tmp_path):
    make_synthetic_fastmri(tmp_path / "shared", n_volumes=3, n_coils=2, image_size=16, n_slices=1)
    folder = DataSource(kind="folder", path=str(tmp_path / "shared"))
    specs = [SiteSpec("a", data=folder), SiteSpec("b", data=folder)]
    with pytest.raises(AssertionError, match="volume-disjoint"):
        simulate_sites(specs, seed=0)


def test_folder_source_splits_by_file(tmp_path):
    files = make_synthetic_fastmri(tmp_path / "data", n_volumes=5, n_coils=2, image_size=16,
                                   n_slices=2)
    spec = SiteSpec("a", data=DataSource(kind="folder", path=str(tmp_path / "data")),
                    split=(0.6, 0.2, 0.2))
    site = simulate_sites([spec], seed=1)["a"]
    got = [f for split in ("train", "val", "test") for f in site.files[split]]
    assert sorted(got) == sorted(files) and len(site.files["train"]) == 3


def test_protocol_vectors_in_every_sample_and_different_across_sites(mri_sites):
    vectors = {}
    for name, site in mri_sites.items():
        expected = site.spec.acquisition.protocol_vector()
        assert torch.equal(site.protocol, expected)
        for sample in all_samples(site):
            assert torch.equal(sample.protocol, expected)
        vectors[name] = expected
    for a, b in itertools.combinations(vectors.values(), 2):
        assert not torch.equal(a, b)


def test_each_site_uses_its_mask_function_and_coils(mri_sites):
    for site in mri_sites.values():
        acq = site.spec.acquisition
        sample = site.train[0]
        assert sample.kspace.shape[0] == acq.n_coils
        sampled = float(sample.mask.mean())
        assert 0.6 / acq.acceleration < sampled < 1.6 / acq.acceleration
        is_2d = acq.mask_type in ("variable_density", "poisson")
        assert (sample.mask.shape[-2] > 1) == is_2d


def test_mri_acquisition_protocol_vector_and_mask_function():
    acq = MRIAcquisition("equispaced_fraction", acceleration=8, center_fraction=0.04, n_coils=4)
    vec = acq.protocol_vector()
    assert vec.dtype == torch.float32 and vec.shape == (len(acq.protocol_fields()),)
    named = dict(zip(acq.protocol_fields(), vec.tolist()))
    assert named["acceleration"] == 8 and named["n_coils"] == 4
    assert named["mask_equispaced_fraction"] == 1 and sum(vec[4:].tolist()) == 1
    assert isinstance(MRIAcquisition("random").mask_function(), RandomMask)
    assert isinstance(MRIAcquisition("variable_density").mask_function(), VariableDensityMask2D)
    assert isinstance(MRIAcquisition("poisson").mask_function(), PoissonDiscMask)
    with pytest.raises(ConfigError, match="did you mean 'equispaced'"):
        MRIAcquisition("equispaced_")
    with pytest.raises(ConfigError, match="integer 'acceleration'"):
        MRIAcquisition("equispaced", acceleration=4.5)


def test_toml_round_trip(tmp_path):
    specs = [*dataset_per_site(2, image_size=32), *acquisition_per_site(2, "mri"),
             *acquisition_per_site(2, "ct", data=SMALL),
             SiteSpec("folder_site", data=DataSource(kind="folder", path="/data/x"),
                      split=(0.8, 0.1, 0.1))]
    path = dump_site_specs(specs, tmp_path / "sites.toml")
    assert load_site_specs(path) == specs
    assert site_specs_to_toml(load_site_specs(path)) == path.read_text()


@pytest.mark.parametrize("name", ["sites_mri_example.toml", "sites_ct_example.toml"])
def test_example_configs_load(name):
    specs = load_site_specs(CONFIGS / name)
    assert len(specs) == 3 and len({s.name for s in specs}) == 3
    assert len({tuple(s.acquisition.protocol_vector().tolist()) for s in specs}) == 3


@pytest.mark.parametrize(("text", "match"), [
    ('acceleraton = 4.0', r"unknown key 'acceleraton'; did you mean 'acceleration'"),
    ('n_coils = "8"', r"key 'n_coils' must be int; got '8'"),
    ('acceleration = "fast"', r"key 'acceleration' must be float"),
])
def test_bad_acquisition_keys_are_named(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(f'[[sites]]\nname = "a"\n[sites.acquisition]\n{text}\n')
    with pytest.raises(ConfigError, match=match) as err:
        load_site_specs(path)
    assert str(path) in str(err.value) and "'a'" in str(err.value)


def test_bad_site_and_data_keys_are_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[sites]]\nname = "a"\nmodalty = "mri"\n')
    with pytest.raises(ConfigError, match="unknown key 'modalty'; did you mean 'modality'"):
        load_site_specs(path)
    path.write_text('[[sites]]\nname = "a"\n[sites.data]\nz_range = [0.1]\n')
    with pytest.raises(ConfigError, match=r"key 'z_range' must be an array of 2"):
        load_site_specs(path)
    path.write_text('[[site]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="did you mean 'site'"):
        load_site_specs(path)
    path.write_text('[[sites]]\nname = "a"\nmodality = "ct"\n[sites.acquisition]\nn_view = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'n_view'; did you mean 'n_views'"):
        load_site_specs(path)


def test_leave_one_site_out():
    specs = dataset_per_site(3)
    train, held = leave_one_site_out(specs, specs[1].name)
    assert held == specs[1] and train == [specs[0], specs[2]]
    assert leave_one_site_out(specs, -1) == (specs[:2], specs[2])
    with pytest.raises(ConfigError, match="did you mean"):
        leave_one_site_out(specs, specs[0].name + "x")


def test_held_out_site_data_do_not_depend_on_the_other_sites(tmp_path):
    specs = [dataclasses.replace(s, data=dataclasses.replace(s.data, n_volumes=3, n_slices=1,
                                                             image_size=16))
             for s in dataset_per_site(3)]
    _, held = leave_one_site_out(specs, 2)
    alone = simulate_sites([held], seed=5, root=tmp_path / "alone")[held.name]
    together = simulate_sites(specs, seed=5, root=tmp_path / "all")[held.name]
    assert {k: [f.name for f in v] for k, v in alone.files.items()} == \
        {k: [f.name for f in v] for k, v in together.files.items()}
    assert torch.equal(alone.train[0].kspace, together.train[0].kspace)
    contrasts = {s.data.contrast for s in specs}
    assert len(contrasts) == 3  # dataset_per_site: one contrast per site


def test_ct_sites(tmp_path):
    specs = acquisition_per_site(3, "ct", data=DataSource(n_volumes=3, n_slices=1, image_size=24))
    assert all(isinstance(s.acquisition, CTAcquisition) for s in specs)
    sites = simulate_sites(specs, seed=0, root=tmp_path)
    check_volume_disjoint(sites)
    protocols = []
    for site in sites.values():
        assert isinstance(site.train, CTSliceDataset)
        acq = site.spec.acquisition
        sample = site.train[0]
        assert sample.sinogram.shape == (acq.n_views, acq.det_count)
        assert torch.equal(sample.protocol, acq.protocol_vector())
        assert sample.target.max() > 0.03  # the simulated skull (~1000 HU)
        protocols.append(sample.protocol)
    for a, b in itertools.combinations(protocols, 2):
        assert not torch.equal(a, b)
