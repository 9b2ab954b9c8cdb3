"""Audit: invalid acquisition values in a sites file are config errors that name the file,
the site and the key."""

from __future__ import annotations

import pytest
from fedrecon.datasets import ConfigError, MRIAcquisition, load_site_specs


@pytest.mark.parametrize("kwargs", [{"noise_std": float("nan")}, {"noise_std": float("inf")},
                                    {"acceleration": float("inf")},
                                    {"acceleration": float("nan")}])
def test_non_finite_mri_acquisition_is_rejected(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        MRIAcquisition(**kwargs)


@pytest.mark.parametrize("line", ["noise_std = nan", "acceleration = inf", "acceleration = 0.5",
                                  'mask_type = "equispced"'])
def test_non_finite_value_in_sites_file_names_site_and_key(tmp_path, line):
    path = tmp_path / "sites.toml"
    path.write_text('[[sites]]\nname = "site_a"\n[sites.acquisition]\n' + line + "\n")
    with pytest.raises(ConfigError, match=line.split()[0]) as info:
        load_site_specs(path)
    assert "site_a" in str(info.value) and str(path) in str(info.value)


def test_data_source_check_in_sites_file_names_file_and_site(tmp_path):
    path = tmp_path / "sites.toml"
    path.write_text('[[sites]]\nname = "site_a"\n[sites.data]\nimage_size = 4\n')
    with pytest.raises(ConfigError, match="image_size") as info:
        load_site_specs(path)
    assert "site_a" in str(info.value) and str(path) in str(info.value)
