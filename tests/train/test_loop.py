import math

import pytest
import torch
from torch import nn

from cmdfed.errors import CmdfedError
from cmdfed.train.loop import NonFiniteLoss, TrainConfig, Trainer, warmup_cosine

CPU = torch.device("cpu")


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def make(seed=0, steps=6, ema=0.0, lr=2e-4):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def loss_fn(batch):
        noise = torch.randn(batch["x"].shape[0], 1)  # the step's RNG, like diffusion noise
        loss = ((model(batch["x"]) - batch["y"] - 0.1 * noise) ** 2).mean()
        return loss, {}

    return model, Trainer(
        model, loss_fn, TrainConfig(steps=steps, seed=seed, warmup_steps=2, ema_decay=ema, lr=lr), CPU
    )


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield {"x": x, "y": x.sum(1, keepdim=True)}


def test_resume_is_bit_exact():
    model_a, trainer_a = make(ema=0.9)
    list(trainer_a.run(batches(), 6))

    model_b, trainer_b = make(ema=0.9)
    stream = batches()
    list(trainer_b.run(stream, 3))
    state, weights, ema = trainer_b.state_dict(), model_b.state_dict(), trainer_b.ema_state_dict()
    model_c, trainer_c = make(ema=0.9)
    model_c.load_state_dict(weights)
    trainer_c.load_state_dict(state, ema)
    list(trainer_c.run(stream, 3))
    assert trainer_c.step == 6
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_c.state_dict()[key]), key
    for key, value in trainer_a.ema_state_dict().items():
        assert torch.equal(value, trainer_c.ema_state_dict()[key]), key


def test_loss_goes_down():
    _, trainer = make(steps=100, lr=0.02)
    losses = [r.loss for r in trainer.run(batches(), 100)]
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])


def test_non_finite_loss_stops_without_stepping():
    model = nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        out = model(batch["x"]).mean()
        return (out * float("nan") if calls["n"] == 3 else out), {}

    trainer = Trainer(model, loss_fn, TrainConfig(steps=5), CPU)
    stream = iter([{"x": torch.ones(1, 2)}] * 5)
    list(trainer.run(stream, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="became nan at step 2"):
        list(trainer.run(stream, 1))
    assert trainer.step == 2 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_validation_and_frozen_models():
    with pytest.raises(CmdfedError, match="steps must be positive"):
        TrainConfig(steps=0)
    with pytest.raises(CmdfedError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"stepz": 3})
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(CmdfedError, match="no trainable parameters"):
        Trainer(model, lambda b: (model(b).sum(), {}), TrainConfig(), CPU)
    assert math.isfinite(TrainConfig().lr)
