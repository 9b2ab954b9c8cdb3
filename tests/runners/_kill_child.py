"""Child process of the kill/resume test: runs a 3-site CT FedAvg run and, on receiving the
first update of round ``block_round`` (that site's LOCAL state for the round is already on
disk), touches ``<run_dir>/blocked`` and sleeps until the parent kills it with SIGKILL."""

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")

from _common import make_ct_sites

from fedrecon.federated import FedAvg
from fedrecon.runners import SimulationRunner


def main(data_dir: str, run_dir: str, rounds: int, block_round: int) -> None:
    torch.set_num_threads(1)  # as the parent test (tests/conftest.py: one_thread)
    files = sorted(Path(data_dir).glob("*.h5"))
    sites = make_ct_sites(files, 3)

    def on_update(update):
        if update.round == block_round:
            (Path(run_dir) / "blocked").touch()
            time.sleep(600)

    runner = SimulationRunner(sites, FedAvg(local_steps=2, lr=3e-3), rounds=rounds,
                              run_dir=run_dir, seed=1, progress=False, on_update=on_update)
    runner.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
