"""A site: its data, its operators (built from its own batches), its LOCAL state, a trainer.

``fit(instructions) -> SiteUpdate`` loads the received GLOBAL tensors over the site's LOCAL
state, trains, keeps every LOCAL tensor (DC layers, conditioning, personal models) in the
site's :class:`~fedrecon.federated.store.LocalStore`, and sends only what
:func:`~fedrecon.federated.messages.make_update` lets through.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedrecon.models import Partition, Scope
from fedrecon.train import evaluate_model, seed_everything, train_local
from fedrecon.train.batching import OpFactory

from .messages import SiteInstructions, SiteUpdate, StateDict, make_update
from .mixture import MixtureOfExperts, fit_mixture_weight
from .store import LocalStore, MemoryStore

__all__ = ["Site", "eval_loader", "site_seed"]


def site_seed(seed: int, site_id: str, round: int) -> int:
    """A seed for (run seed, site, round): reproducible and different across sites/rounds."""
    digest = hashlib.sha256(f"{seed}/{site_id}/{round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _proximal(model: nn.Module, names: set[str], anchor: Mapping[str, Tensor],
              coef: float) -> Callable[[nn.Module], Tensor]:
    anchors = {k: v.detach() for k, v in anchor.items() if k in names}

    def term(m: nn.Module) -> Tensor:
        total = torch.zeros((), device=next(m.parameters()).device)
        for name, p in m.named_parameters():
            if name in anchors:
                total = total + (p - anchors[name].to(p.device)).square().sum()
        return 0.5 * coef * total

    return term


def eval_loader(dataset: Any, batch_size: int, collate: Callable) -> Any:
    """An evaluation ``DataLoader`` over ``dataset`` (``None`` for ``None``), in order; over
    fastMRI files its batches never mix k-space shapes (coil counts and matrix sizes vary
    from volume to volume in a site's real data), whatever ``batch_size``."""
    from torch.utils.data import DataLoader

    if dataset is None:
        return None
    shape_batches = getattr(dataset, "shape_batches", None)
    if shape_batches is not None:
        return DataLoader(dataset, batch_sampler=shape_batches(batch_size), collate_fn=collate)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate)


class Site:
    """One hospital in the federation.

    Parameters
    ----------
    site_id
        Unique name.
    model_factory
        Builds a fresh model (same architecture at every site).
    train_loader, val_loader, test_loader
        Iterables of collated batches from :mod:`fedrecon.datasets`.
    partition
        Which roles stay here (must match the strategy's).
    store
        Where the LOCAL state lives between rounds (default: in memory).
    protocol
        The site's public protocol vector (acquisition parameters), or ``None``.
    progress
        Show a progress bar over the local steps of each round.
    """

    def __init__(self, site_id: str, *, model_factory: Callable[[], nn.Module],
                 train_loader: Iterable, val_loader: Iterable | None = None,
                 test_loader: Iterable | None = None, partition: Partition | None = None,
                 store: LocalStore | None = None, device: str | torch.device = "cpu",
                 op_factory: OpFactory | None = None, loss: str = "l1",
                 grad_clip: float | None = 1.0, seed: int = 0,
                 protocol: Tensor | None = None, num_examples: int | None = None,
                 progress: bool = False) -> None:
        self.site_id = site_id
        self.model_factory = model_factory
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.partition = partition or Partition.default()
        self.store = store if store is not None else MemoryStore()
        self.device = torch.device(device)
        self.op_factory = op_factory
        self.loss = loss
        self.grad_clip = grad_clip
        self.seed = seed
        self.protocol = protocol
        self.progress = progress  # a tqdm bar over the local steps of each fit
        dataset = getattr(train_loader, "dataset", None)
        self.num_examples = num_examples if num_examples is not None else (
            len(dataset) if dataset is not None else 1)

    @classmethod
    def from_datasets(cls, site_id: str, datasets: Mapping[str, Any], *, modality: str,
                      batch_size: int, eval_batch_size: int, loader_seed: int,
                      **kwargs: Any) -> Site:
        """A site over ``split -> dataset`` (``train`` required; ``val``/``test`` may be
        ``None``): a shuffled training loader with its own generator seeded by
        ``loader_seed`` (checkpointed by the runners), evaluation loaders, and the collate
        function of ``modality`` ("mri" or "ct"). ``kwargs`` go to the constructor. The
        embedded runner and the Flower ClientApp both build their sites here."""
        from torch.utils.data import DataLoader

        from fedrecon.datasets import collate_ct_samples, collate_mri_samples

        if modality not in ("mri", "ct"):
            raise ValueError(f"argument 'modality' must be 'mri' or 'ct'; got {modality!r}")
        if datasets.get("train") is None:
            raise ValueError(f"site '{site_id}': no training data")
        collate = collate_mri_samples if modality == "mri" else collate_ct_samples

        train = DataLoader(datasets["train"], batch_size=batch_size, collate_fn=collate,
                           shuffle=True,
                           generator=torch.Generator().manual_seed(loader_seed % 2**63))
        return cls(site_id, train_loader=train,
                   val_loader=eval_loader(datasets.get("val"), eval_batch_size, collate),
                   test_loader=eval_loader(datasets.get("test"), eval_batch_size, collate),
                   **kwargs)

    # -- state ------------------------------------------------------------------------------
    def _private(self) -> dict[str, Any]:
        return self.store.get(self.site_id) or {}

    def build_model(self, global_state: Mapping[str, Tensor] | None = None,
                    personal: bool = False,
                    private: Mapping[str, Any] | None = None) -> nn.Module:
        """A model with this site's LOCAL state (and ``global_state`` over it, if given).

        ``personal=True`` returns the site's personal model (Ditto) when it has one.
        ``private`` is the site's stored state when the caller has already read it.
        """
        private = self._private() if private is None else private
        model = self.model_factory().to(self.device)
        if personal and "personal" in private:
            model.load_state_dict(private["personal"])
            return model
        if "local" in private:
            own = model.state_dict()
            wrong = sorted(k for k, v in private["local"].items()
                           if k not in own or tuple(own[k].shape) != tuple(v.shape))
            if wrong:
                raise ValueError(f"site '{self.site_id}': its stored LOCAL state does not fit "
                                 f"this model (missing here or another shape: {wrong[:5]}); "
                                 f"was it written by another model?")
            with torch.no_grad():
                for k, v in private["local"].items():
                    own[k].copy_(v)
        if global_state is not None:
            self.partition.load_global(model, global_state)
        return model

    def initial_global_state(self) -> StateDict:
        """The GLOBAL tensors of a freshly built model (the federation's starting point)."""
        return self.partition.global_state(self.model_factory())

    # -- one round --------------------------------------------------------------------------
    def fit(self, instructions: SiteInstructions) -> SiteUpdate:
        if instructions.site_id != self.site_id:
            raise ValueError(f"instructions for '{instructions.site_id}' sent to '{self.site_id}'")
        plan = instructions.plan
        seed = site_seed(self.seed, self.site_id, instructions.round)
        seed_everything(seed)
        wants_personal = plan.personal_lambda is not None
        gen = getattr(self.train_loader, "generator", None) if wants_personal else None
        gen_state = gen.get_state() if isinstance(gen, torch.Generator) else None
        private = self._private()
        model = self.build_model(instructions.global_state, private=private)
        initial = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                   if wants_personal and "personal" not in private else None)
        start = {k: v.detach().clone() for k, v in instructions.global_state.items()}
        global_names = set(self.partition.names(model, Scope.GLOBAL))
        params = dict(model.named_parameters())
        metrics: dict[str, float] = {}

        def run(steps: int, trainable: Callable[[str], bool], regularizer=None,
                net: nn.Module = model) -> Any:
            flags = {n: p.requires_grad for n, p in net.named_parameters()}
            for n, p in net.named_parameters():
                p.requires_grad_(trainable(n))
            try:
                return train_local(net, self.train_loader, steps=steps, lr=plan.lr, loss=self.loss,
                                   op_factory=self.op_factory, grad_clip=self.grad_clip,
                                   device=self.device, regularizer=regularizer,
                                   progress=self.progress)
            finally:
                for n, p in net.named_parameters():
                    p.requires_grad_(flags[n])

        local_names = set(params) - global_names
        if plan.local_first_steps and local_names:
            res = run(plan.local_first_steps, lambda n: n in local_names)
            metrics["local_first_loss"] = res.mean_loss
        if plan.local_steps:
            reg = _proximal(model, global_names, start, plan.prox_mu) if plan.prox_mu > 0 else None
            def trainable(n: str) -> bool:
                return plan.train_global if n in global_names else plan.train_local
            res = run(plan.local_steps, trainable, reg)
            metrics.update(loss=res.mean_loss, last_loss=res.last_loss, train_seconds=res.seconds)
        if wants_personal:
            personal = self.model_factory().to(self.device)
            # the first round starts from the received state, as the global model did
            personal.load_state_dict(private["personal"] if initial is None else initial)
            # the personal model sees what a local-only site sees this round: the same seed
            # and the same batches as the global steps (with lambda = 0 it *is* local-only
            # training, bit for bit)
            seed_everything(seed)
            if gen_state is not None:
                gen.set_state(gen_state)
            reg = (_proximal(personal, global_names, start, plan.personal_lambda)
                   if plan.personal_lambda > 0 else None)
            res = run(max(plan.local_steps, 1), lambda n: True, reg, net=personal)
            metrics["personal_loss"] = res.mean_loss
            private["personal"] = {k: v.detach().cpu() for k, v in personal.state_dict().items()}
        if plan.mixture:
            private["mixture"] = True
        private["local"] = {k: v.cpu() for k, v in self.partition.local_state(model).items()}
        private["round"] = instructions.round
        self.store.put(self.site_id, private)
        return make_update(model, self.partition, site_id=self.site_id, round=instructions.round,
                           start=start, kind=plan.send, num_examples=self.num_examples,
                           metrics=metrics)

    @torch.no_grad()
    def evaluate(self, global_state: Mapping[str, Tensor] | None = None, *, split: str = "val",
                 personal: bool | None = None) -> dict[str, float]:
        """PSNR/SSIM/NMSE on ``split`` ("val" or "test") with this site's LOCAL state and
        ``global_state``; the personal model when the site has one (Ditto) unless told not to."""
        loader = {"val": self.val_loader, "test": self.test_loader, "train": self.train_loader}.get(split)
        if loader is None:
            raise ValueError(f"site '{self.site_id}' has no '{split}' data")
        model = self.evaluation_model(global_state, personal=personal)
        return evaluate_model(model, loader, op_factory=self.op_factory, device=self.device)

    def evaluation_model(self, global_state: Mapping[str, Tensor] | None = None, *,
                         personal: bool | None = None) -> nn.Module:
        """The model this site reconstructs with: its LOCAL state with ``global_state``, or
        its personal model (Ditto) when it has one, unless ``personal=False``."""
        private = self._private()
        has_personal = "personal" in private
        use_personal = has_personal if personal is None else (personal and has_personal)
        if use_personal and personal is None and private.get("mixture"):
            return self.mixture_model(global_state, private=private)
        model = self.build_model(None if use_personal else global_state, personal=use_personal,
                                 private=private)
        return model.eval()

    def mixture_model(self, global_state: Mapping[str, Tensor] | None = None, *,
                      private: Mapping[str, Any] | None = None) -> MixtureOfExperts:
        """The personal expert and the shared expert (this site's LOCAL state with
        ``global_state``) mixed by one gate fitted on this site's validation split (its
        training split when it has none); the gate is ``.alpha``, the validation PSNR of
        every gate tried ``.scores``."""
        private = self._private() if private is None else private
        if "personal" not in private:
            raise ValueError(f"site '{self.site_id}' has no personal model to mix (train it "
                             "with a personal_lambda first)")
        personal = self.build_model(personal=True, private=private).eval()
        shared = self.build_model(global_state, private=private).eval()
        loader = self.val_loader if self.val_loader is not None else self.train_loader
        alpha, scores = fit_mixture_weight(personal, shared, loader, op_factory=self.op_factory,
                                           device=self.device)
        model = MixtureOfExperts(personal, shared, alpha).eval()
        model.scores = scores
        return model
