"""End to end through the ``fedrecon`` command: train -> resume -> evaluate on a tiny CT
federation, and the config errors users hit first (issue #6)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fedrecon.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

SITE = """
[[sites]]
name = "{name}"
modality = "ct"
split = [0.34, 0.33, 0.33]
[sites.data]
kind = "synthetic"
n_volumes = 3
n_slices = 2
image_size = 16
[sites.acquisition]
geometry = "parallel"
n_views = {views}
photons = 1e5
image_size = [16, 16]
pixel_spacing = 13.75
det_spacing = 13.75
"""

HEAD = """seed = 0
rounds = {rounds}
local_steps = 2
lr = 2e-3
batch_size = 2
[strategy]
name = "{strategy}"
[model]
n_iter = 2
chans = 4
num_pools = 1
"""


def write_config(path: Path, *, rounds: int = 2, strategy: str = "partial", extra: str = "",
                 sites: str | None = None) -> Path:
    text = extra + HEAD.format(rounds=rounds, strategy=strategy)
    text += sites if sites is not None else (SITE.format(name="north", views=8)
                                             + SITE.format(name="south", views=12))
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = write_config(root / "run.toml", rounds=2)
    run = root / "run"
    # one round, then resume to two: the resume path is part of the contract
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(run), "--rounds", "1"]) == 0
    assert main(["--quiet", "resume", "--run", str(run), "--rounds", "2"]) == 0
    return root, run


def test_train_writes_run_folder(trained) -> None:
    _, run = trained
    for name in ("config.toml", "checkpoint.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["completed_rounds"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2  # one record per site per round
    # the effective config names the materialized folders and reloads
    from fedrecon.experiment import load_config
    cfg = load_config(run / "config.toml")
    assert cfg.rounds == 2 and [e.name for e in cfg.sites] == ["north", "south"]
    assert all(e.folders is not None and e.folders["test"].is_dir() for e in cfg.sites)


def test_evaluate_tables_and_reconstructions(trained) -> None:
    root, run = trained
    out = root / "eval"
    assert main(["--quiet", "evaluate", "--run", str(run), "--data-split", "test", "--out",
                 str(out), "--baselines", "fbp"]) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["site"], r["method"]) for r in rows} == {
        (s, m) for s in ("north", "south") for m in ("partial", "fbp")}
    for name in ("report.md", "metrics.md", "metrics_volumes.csv", "figures/00_north.png",
                 "figures/curves.png"):
        assert (out / name).is_file(), name
    # the saved reconstructions, scored independently with scikit-image against targets
    # read from the test split: fastMRI's volume PSNR / mean-slice SSIM
    from fedrecon.experiment import load_config, site_datasets
    cfg = load_config(run / "config.toml")
    for entry in cfg.sites:
        test = site_datasets(cfg, entry)["test"]
        targets: dict[str, dict[int, np.ndarray]] = {}
        for i in range(len(test)):
            s = test[i]
            targets.setdefault(s.fname, {})[int(s.slice_num)] = s.target.numpy().astype(np.float64)
        row = next(r for r in rows if r["site"] == entry.name and r["method"] == "partial")
        psnrs, ssims = [], []
        for fname, by_slice in targets.items():
            gt = np.stack([by_slice[k] for k in sorted(by_slice)])
            with h5py.File(out / "reconstructions" / "partial" / entry.name /
                           f"{Path(fname).name}", "r") as hf:
                rec = hf["reconstruction"][()].astype(np.float64)
            assert rec.shape == gt.shape
            psnrs.append(peak_signal_noise_ratio(gt, rec, data_range=gt.max()))
            ssims.append(np.mean([structural_similarity(gt[k], rec[k], data_range=gt.max(),
                                                        win_size=7) for k in range(len(gt))]))
        assert float(row["psnr"]) == pytest.approx(np.mean(psnrs), abs=1e-3)
        assert float(row["ssim"]) == pytest.approx(np.mean(ssims), abs=1e-4)
    # an existing evaluation folder is not overwritten by accident
    assert main(["--quiet", "evaluate", "--run", str(run), "--out", str(out)]) == 2


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrecon.cli", *args], check=False,
                          capture_output=True,
                          text=True, timeout=300)


def test_misspelled_key_exits_2_without_run_folder(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.toml", extra="lokal_steps = 3\n")
    out = tmp_path / "run"
    res = _run_cli("train", "--config", str(cfg), "--out", str(out))
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "lokal_steps" in err[0] and "local_steps" in err[0], res.stderr
    assert not out.exists()


@pytest.mark.parametrize("site_text, needle", [
    ('\n[[sites]]\nname = "x"\nmodality = "mri"\ntrain = "no/such/folder"\n', "no/such/folder"),
    (('\n[[sites]]\nname = "x"\nmodality = "mri"\n[sites.acquisition]\nmask = "random"\n'
     'acceleration = 0.5\n'), "acceleration"),
    ('\n[[sites]]\nname = "x"\nmodality = "mri"\n[sites.acquisition]\nmask = "randum"\n',
     "random"),
])
def test_config_errors_name_the_problem(tmp_path: Path, capsys, site_text: str,
                                        needle: str) -> None:
    cfg = write_config(tmp_path / "bad.toml", sites=site_text)
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_strategy_and_model_errors(tmp_path: Path, capsys) -> None:
    for extra, needle in (("", "fedavgg"), ("", "chanz")):
        text = write_config(tmp_path / "c.toml").read_text()
        if needle == "fedavgg":
            text = text.replace('name = "partial"', 'name = "fedavgg"')
        else:
            text = text.replace("chans = 4", "chanz = 4")
        (tmp_path / "c.toml").write_text(text)
        assert main(["--quiet", "train", "--config", str(tmp_path / "c.toml"), "--out",
                     str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert not (tmp_path / "r").exists()


def test_train_refuses_an_existing_run(trained, capsys) -> None:
    root, run = trained
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["--quiet", "train", "--config", str(root / "run.toml"), "--out", str(run)]) == 2
    assert "resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_shipped_configs_validate() -> None:
    """Every config in configs/ parses (the files users start from)."""
    from fedrecon.experiment import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 4
    names = {load_config(f).strategy_name for f in files}
    assert {"partial", "hypernetwork"} <= names
    assert load_config(root / "loso_mri.toml").held_out == "east"


def test_leave_one_site_out(tmp_path: Path) -> None:
    """The held-out site never trains (no update, no bytes) but is evaluated every round
    and in `evaluate`, with the consensus prior."""
    import json

    cfg = write_config(tmp_path / "loso.toml", rounds=1, extra='held_out = "south"\n')
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    south = [r for r in records if r["site"] == "south"]
    north = [r for r in records if r["site"] == "north"]
    assert len(south) == 1 and not south[0]["participated"] and south[0]["bytes_sent"] == 0
    assert south[0]["psnr"] is not None and north[0]["participated"]
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--run", str(run), "--out", str(out),
                 "--no-reconstructions"]) == 0
    with open(out / "metrics.csv") as f:
        assert {r["site"] for r in csv.DictReader(f)} == {"north", "south"}
    assert "never trained" in (out / "report.md").read_text()


def test_evaluate_on_an_external_folder(trained) -> None:
    """`--data FOLDER --site NAME`: the site's model on other files (here: the other site's
    test volumes, under this site's acquisition)."""
    from fedrecon.experiment import load_config

    root, run = trained
    cfg = load_config(run / "config.toml")
    folder = next(e for e in cfg.sites if e.name == "south").folders["test"]
    out = root / "eval_external"
    assert main(["--quiet", "evaluate", "--run", str(run), "--data", str(folder), "--site",
                 "north", "--out", str(out), "--baselines", "fbp"]) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["site"], r["method"]) for r in rows} == {("north", "partial"), ("north", "fbp")}
    assert main(["--quiet", "evaluate", "--run", str(run), "--data", str(root / "nowhere"),
                 "--site", "north", "--out", str(root / "e2")]) == 2
    assert not (root / "e2").exists()


def test_privacy_table_in_a_run(tmp_path: Path, capsys) -> None:
    """[privacy] from the run config reaches the runner: secure aggregation + DP-FedAvg
    records epsilon; an incompatible strategy is a config error (exit 2, no run folder)."""
    import json

    privacy = ("\n[privacy.secure_aggregation]\n[privacy.dp]\nclip_norm = 1.0\n"
               "noise_multiplier = 0.5\n")
    cfg = write_config(tmp_path / "dp.toml", rounds=1, strategy="fedavg")
    cfg.write_text(cfg.read_text().replace("[[sites]]", privacy + "\n[[sites]]", 1))
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = {r["epsilon"] for r in records}
    assert len(eps) == 1 and 0 < eps.pop() < float("inf")
    assert "[privacy.dp]" in (run / "config.toml").read_text()
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--run", str(run), "--out", str(out),
                 "--no-reconstructions"]) == 0
    report = (out / "report.md").read_text()
    sent = sum(r["bytes_sent"] for r in records) / 1e6
    assert "DP epsilon" in report and f"{sent:.3f}" in report

    bad = write_config(tmp_path / "bad.toml", rounds=1, strategy="similarity")
    bad.write_text(bad.read_text().replace("[[sites]]", privacy + "\n[[sites]]", 1))
    assert main(["--quiet", "train", "--config", str(bad), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "similarity" in err and not (tmp_path / "r2").exists()


def test_compression_table_in_a_run(tmp_path: Path, capsys) -> None:
    """[compression] top-k: the recorded upload bytes shrink against the dense run's;
    a misspelled key is a config error."""
    import json

    def sent(run: Path) -> int:
        return sum(json.loads(x)["bytes_sent"] for x in (run / "metrics.jsonl").read_text()
                   .splitlines())

    dense = write_config(tmp_path / "dense.toml", rounds=1)
    assert main(["--quiet", "train", "--config", str(dense), "--out", str(tmp_path / "d")]) == 0
    comp = write_config(tmp_path / "comp.toml", rounds=1)
    comp.write_text(comp.read_text().replace(
        "[[sites]]", '\n[compression]\nmethod = "topk"\nfraction = 0.05\n\n[[sites]]', 1))
    assert main(["--quiet", "train", "--config", str(comp), "--out", str(tmp_path / "c")]) == 0
    # a tiny model: tensor names are a large share of a 5% message, hence not 1/20
    assert 0 < sent(tmp_path / "c") < 0.5 * sent(tmp_path / "d")
    assert (tmp_path / "c" / "communication.json").is_file()
    comp.write_text(comp.read_text().replace("fraction = 0.05", "fractoin = 0.05"))
    assert main(["--quiet", "train", "--config", str(comp), "--out", str(tmp_path / "x")]) == 2
    assert "fractoin" in capsys.readouterr().err and not (tmp_path / "x").exists()
