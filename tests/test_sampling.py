"""sampling: the quality guard's images are drawn from the whole stage, and drawing them changes nothing the stage
runs, writes or the order it does so in."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from dsm_lightning import DSMCallback, DSMConfig, apply_dsm, remove_dsm
from dsm_lightning.sampling import sample_loader, sample_stage_inputs
from tests.conftest import tiny_vit
from tests.lightning_helpers import trainer


class Classifier(LightningModule):
    """A tiny ViT classifier over ``(image, index)`` batches that records the indices each step saw."""

    def __init__(self, vit=None):
        super().__init__()
        self.vit = vit if vit is not None else tiny_vit(num_classes=3)
        self.seen: list = []
        self.agree: list = []

    def forward(self, x):
        return self.vit(x)

    def validation_step(self, batch, batch_idx):
        x, idx = batch
        logits = self(x)
        self.seen.extend(idx.tolist())
        return logits.sum()

    def predict_step(self, batch, batch_idx):
        x, idx = batch
        out = self(x)
        self.seen.extend(idx.tolist())
        return out.argmax(-1)


def _tensors(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n))


def test_sample_stage_inputs_draws_from_the_whole_stage_and_leaves_its_order_alone():
    module = Classifier()
    loader = DataLoader(_tensors(40), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    t = trainer(callbacks=[DSMCallback(min_agreement=None)])
    t.validate(module, dataloaders=loader, verbose=False)
    order_without = list(module.seen)

    captured = {}

    class Probe(DSMCallback):
        def on_validation_start(self, trainer, pl_module):
            drawn = sample_stage_inputs(trainer, pl_module, pl_module.vit, "validate", 12)
            captured["drawn"] = drawn
            super().on_validation_start(trainer, pl_module)

    module.seen = []
    loader = DataLoader(_tensors(40), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    trainer(callbacks=[Probe(min_agreement=None)]).validate(module, dataloaders=loader, verbose=False)
    images, stage_images = captured["drawn"]
    assert stage_images == 40 and images.shape == (12, 3, 32, 32)
    assert module.seen == order_without, "drawing the sample must not change the stage's order"
    data = _tensors(40).tensors[0]
    rows = [int(torch.nonzero((data == img).flatten(1).all(1))[0]) for img in images]
    assert len(set(rows)) == 12 and max(rows) >= 20, "a uniform draw, not the stage's head"


def test_sample_stage_inputs_respects_limit_batches_and_refuses_iterable_loaders():
    module = Classifier()

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.randn(3, 32, 32), torch.tensor(i)) for i in range(8))

    got = {}

    class Probe(DSMCallback):
        def on_validation_start(self, trainer, pl_module):
            got["drawn"] = sample_stage_inputs(trainer, pl_module, pl_module.vit, "validate", 100)
            super().on_validation_start(trainer, pl_module)

    t = trainer(callbacks=[Probe(min_agreement=None)], limit_val_batches=3)
    t.validate(module, dataloaders=DataLoader(_tensors(40), batch_size=4), verbose=False)
    assert got["drawn"][1] == 12, "only the 3 batches the stage runs"
    trainer(callbacks=[Probe(min_agreement=None)]).validate(
        module, dataloaders=DataLoader(Stream(), batch_size=4), verbose=False
    )
    assert got["drawn"] is None


def test_iterable_stage_falls_back_to_the_guard_on_its_first_images():
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            yield from ((torch.randn(3, 32, 32, generator=g), torch.tensor(i)) for i in range(24))

    cb = DSMCallback(delay=1, r=2, min_agreement=0.01, guard_images=8, guard_confidence=None)
    trainer(callbacks=[cb]).validate(Classifier(), dataloaders=DataLoader(Stream(), batch_size=4), verbose=False)
    assert cb.guard is not None and cb.guard.config is not None
    assert "the first of the stage" in cb.guard.reason()


def test_predictions_and_their_order_are_the_same_with_the_guard_sampling():
    vit = tiny_vit(num_classes=3)
    loader = DataLoader(_tensors(32), batch_size=4)
    cb = DSMCallback(delay=1, r=2, min_agreement=0.01, guard_images=8, guard_confidence=None, guard_audit=0.0)
    module = Classifier(vit)
    guarded = torch.cat(trainer(callbacks=[cb]).predict(module, dataloaders=loader))
    assert module.seen == list(range(32)) and cb.guard.config == DSMConfig(delay=1, r=2)
    apply_dsm(vit, cb.guard.config)
    with torch.no_grad():
        plain = vit(_tensors(32).tensors[0]).argmax(-1)
    remove_dsm(vit)
    assert torch.equal(guarded, plain)


def test_sample_loader_draws_uniformly_in_dataset_order_and_keeps_collation():
    loader = DataLoader(_tensors(50), batch_size=8)
    sampled = sample_loader(loader, 10, seed=1)
    idx = torch.cat([b[1] for b in sampled]).tolist()
    assert len(idx) == 10 and idx == sorted(idx) and max(idx) >= 25 and sampled.batch_size == 8
    assert len(list(sample_loader(loader, 500))) == 7, "all 50 when fewer than asked"
