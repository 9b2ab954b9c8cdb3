"""User errors of the ``fedrecon`` command that must be one-line errors with exit status 2
(no traceback, nothing half-written), and resume / evaluate details: --rounds bounds, damaged
or mismatched checkpoints, strategy values, a pre-existing output folder, --label paths."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from fedrecon.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

SITE = """
[[sites]]
name = "{name}"
modality = "ct"
split = {split}
[sites.data]
kind = "synthetic"
n_volumes = {volumes}
n_slices = 2
image_size = 16
[sites.acquisition]
geometry = "parallel"
n_views = 8
photons = 1e5
image_size = [16, 16]
pixel_spacing = 13.75
det_spacing = 13.75
"""


def config(path: Path, *, rounds: int = 1, head: str = "", strategy: str = 'name = "partial"',
           split: str = "[0.34, 0.33, 0.33]", volumes: int = 3) -> Path:
    text = (f"{head}seed = 0\nrounds = {rounds}\nlocal_steps = 1\nlr = 2e-3\nbatch_size = 2\n"
            f"[strategy]\n{strategy}\n[model]\nn_iter = 1\nchans = 4\nnum_pools = 1\n")
    for name in ("north", "south"):
        text += SITE.format(name=name, split=split, volumes=volumes)
    path.write_text(text)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    """A finished 2-round run."""
    root = tmp_path_factory.mktemp("audit_cli")
    run = root / "run"
    assert main(["--quiet", "train", "--config", str(config(root / "c.toml", rounds=2)),
                 "--out", str(run)]) == 0
    return run


def test_train_rounds_must_be_positive(tmp_path: Path) -> None:
    """`--rounds 0` used to train nothing and save rounds = 0 in the run's config.toml, a
    value load_config refuses: the run could then never be resumed nor evaluated."""
    cfg = config(tmp_path / "c.toml")
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exc:
            main(["--quiet", "train", "--config", str(cfg), "--out", str(tmp_path / "r"),
                  "--rounds", bad])
        assert exc.value.code == 2
        assert not (tmp_path / "r").exists()


def test_simulate_data_seed_must_be_nonnegative(tmp_path: Path) -> None:
    """A negative --seed used to end in numpy's SeedSequence traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", "simulate-data", "--config", str(config(tmp_path / "c.toml")),
              "--out", str(tmp_path / "data"), "--seed", "-1"])
    assert exc.value.code == 2 and not (tmp_path / "data").exists()


def test_resume_cannot_shrink_or_zero_a_run(run2: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    before = (run / "config.toml").read_text()
    assert main(["--quiet", "resume", "--run", str(run), "--rounds", "1"]) == 2
    msg = one_line_error(capsys)
    assert "--rounds 1" in msg and "2 rounds" in msg
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", "resume", "--run", str(run), "--rounds", "0"])
    assert exc.value.code == 2
    # the effective config still says 2 and the run still resumes and evaluates
    assert (run / "config.toml").read_text() == before
    assert main(["--quiet", "resume", "--run", str(run)]) == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_checkpoint_is_a_one_line_error(run2: Path, tmp_path: Path, capsys,
                                                damage: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"garbage": b"not a checkpoint", "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    assert main(["--quiet", "resume", "--run", str(run), "--rounds", "3"]) == 2
    assert str(ckpt) in one_line_error(capsys)
    assert main(["--quiet", "evaluate", "--run", str(run), "--out", str(tmp_path / "ev")]) == 2
    assert str(ckpt) in one_line_error(capsys)
    assert not (tmp_path / "ev").exists()


def test_checkpoint_of_another_config_is_a_one_line_error(run2: Path, tmp_path: Path,
                                                          capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace('name = "partial"', 'name = "fedavg"'))
    assert main(["--quiet", "resume", "--run", str(run), "--rounds", "3"]) == 2
    msg = one_line_error(capsys)
    assert "checkpoint.pt" in msg and "config.toml" in msg and "fedavg" in msg
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["completed_rounds"] == 2  # untouched


@pytest.mark.parametrize("head, strategy, needle", [
    ("grad_clip = -1.0\n", 'name = "partial"', "grad_clip"),  # would flip the gradients
    ("seed = -3\n", 'name = "partial"', "seed"),
    ("", 'name = "fedprox"\nmu = "big"', "mu"),
    ("", 'name = "fedprox"\nmu = -1.0', "mu"),
    ("", 'name = "multi_krum"\nbyzantine = 1.5', "byzantine"),
])
def test_bad_values_name_file_and_key(tmp_path: Path, capsys, head: str, strategy: str,
                                      needle: str) -> None:
    path = tmp_path / "bad.toml"
    text = config(path, strategy=strategy).read_text()
    if head:  # replace the default key rather than repeat it
        key = head.split("=")[0].strip()
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        path.write_text(head + "\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--config", str(path), "--out", str(out)]) == 2
    msg = one_line_error(capsys)
    assert str(path) in msg and f"'{needle}'" in msg, msg
    assert not out.exists()


def test_failed_start_leaves_an_existing_out_folder_as_it_was(tmp_path: Path, capsys) -> None:
    """A config error found after the synthetic data was simulated (here: no val split) must
    not leave <out>/data behind: the corrected config would then be refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad = config(tmp_path / "bad.toml", split="[0.5, 0.0, 0.5]", volumes=2)
    assert main(["--quiet", "train", "--config", str(bad), "--out", str(out)]) == 2
    assert str(bad) in one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # with data_root outside the run folder: the simulated site folders go too
    text = bad.read_text()
    bad.write_text('data_root = "shared_data"\n' + text)
    assert main(["--quiet", "train", "--config", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "shared_data").exists() and not (tmp_path / "r2").exists()
    good = config(tmp_path / "good.toml")
    assert main(["--quiet", "train", "--config", str(good), "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint.pt").is_file()


def test_label_matches_the_run_folder_as_a_path(run2: Path, capsys) -> None:
    out = run2.parent / "ev_label"
    assert main(["--quiet", "evaluate", "--run", str(run2), "--out", str(out),
                 "--no-reconstructions", "--label", f"{run2}/=mine"]) == 0
    with open(out / "metrics.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"mine"}
    capsys.readouterr()
    assert main(["--quiet", "evaluate", "--run", str(run2), "--out", str(out / "x"),
                 "--label", "elsewhere=mine"]) == 2
    assert "--label" in one_line_error(capsys) and not (out / "x").exists()


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """1 round + resume to 2 gives bit for bit the strategy state and metrics of 2 rounds
    (a server optimizer: its moments must survive the checkpoint)."""
    cfg = config(tmp_path / "c.toml", rounds=2, strategy='name = "fedadam"')
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(a)]) == 0
    assert main(["--quiet", "train", "--config", str(cfg), "--out", str(b), "--rounds", "1"]) == 0
    assert main(["--quiet", "resume", "--run", str(b), "--rounds", "2"]) == 0

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}/{i}")

    sa = dict(tensors(torch.load(a / "checkpoint.pt", weights_only=False)["strategy"]))
    sb = dict(tensors(torch.load(b / "checkpoint.pt", weights_only=False)["strategy"]))
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    import json

    def scores(run):
        return [(r["round"], r["site"], r["psnr"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert scores(a) == scores(b)


def test_runs_trained_on_other_acquisitions_are_noted(run2: Path, tmp_path: Path) -> None:
    """Every run is evaluated on the first run's sites; a run trained with other views is
    named in the report (it used to be compared silently)."""
    text = config(tmp_path / "c.toml").read_text().replace("n_views = 8", "n_views = 12", 1)
    other = tmp_path / "other"
    (tmp_path / "c.toml").write_text(text)
    assert main(["--quiet", "train", "--config", str(tmp_path / "c.toml"), "--out", str(other)]) == 0
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--run", str(run2), str(other), "--out", str(out),
                 "--label", f"{run2}=a", f"{other}=b", "--no-reconstructions"]) == 0
    report = (out / "report.md").read_text()
    assert "Run `b`" in report and "another acquisition at site `north`" in report
    assert "site `south`" not in report  # only the site whose acquisition differs
    same = tmp_path / "eval_same"
    assert main(["--quiet", "evaluate", "--run", str(run2), "--out", str(same),
                 "--no-reconstructions"]) == 0
    assert "another acquisition" not in (same / "report.md").read_text()
