"""fedrecon.datasets: fastMRI-format loading, CT data and heterogeneous site simulation."""

# --- fastMRI (owned by the fastMRI work) ---
from .fastmri import (
    FastMRIFormatError,
    FastMRIReadError,
    FastMRISliceDataset,
    HeaderInfo,
    MRIBatch,
    MRISample,
    SkippedFile,
    VolumeInfo,
    collate_mri_samples,
    parse_ismrmrd_header,
    read_volume_info,
)
from .fastmri_write import ismrmrd_header_xml, write_fastmri_volume
from .mri_transforms import (
    CoilMapCache,
    EspiritSettings,
    acs_width,
    apply_mask,
    center_crop,
    normalize,
    normalize_instance,
    rss_target,
    zero_filled,
)
# --- synthetic + sites (owned by the sites work) ---
from .anatomy import BrainSlices, load_brain_slices, resolve_anatomy_source
from .config import ConfigError
from .recipes import acquisition_per_site, dataset_per_site, leave_one_site_out
from .site_simulation import SiteData, check_volume_disjoint, simulate_sites
from .sites import DataSource, MRIAcquisition, SiteSpec, dump_site_specs, load_site_specs
from .synthetic import make_synthetic_fastmri
# --- CT (owned by the CT work) ---
from .ct import (
    CT_UNITS,
    GEOMETRY_CODES,
    MU_WATER_PER_MM,
    PROTOCOL_FIELDS,
    CTAcquisition,
    CTBatch,
    CTFileError,
    CTSample,
    CTSliceDataset,
    CTVolume,
    CTVolumeInfo,
    attenuation_to_hu,
    collate_ct_samples,
    hu_to_attenuation,
    patient_split,
    read_ct_volume,
    read_ct_volume_info,
    slice_seed,
    write_ct_volume,
)
from .ct_phantoms import TISSUE_HU, random_ellipses, write_phantom_volumes
from .dicom import import_dicom_series

__all__ = [name for name in dir() if not name.startswith("_")]
