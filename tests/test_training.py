"""Training mechanics on toy models whose updates can be checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ticketguard.errors import ConfigError
from ticketguard.tickets.mask import Mask
from ticketguard.tickets.training import (
    MagnitudeFloor,
    TrainConfig,
    derive_seed,
    evaluate,
    floored,
    iterations_per_epoch,
    resolve_device,
    train,
)

CPU = torch.device("cpu")


def _toy() -> tuple[nn.Module, TensorDataset]:
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.4, -0.6]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [0.0, 1.0, -1.0], [2.0, -1.0, 0.5]])
    y = torch.tensor([0, 1, 1, 0])
    return model, TensorDataset(x, y)


def test_one_sgd_step_matches_the_hand_computation_and_respects_the_mask() -> None:
    model, data = _toy()
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 2] = False
    keep[1, 0] = False
    mask = Mask({"weight": keep})
    w0 = model.weight.detach().clone() * keep
    x, y = data.tensors
    w_ref = w0.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(x @ w_ref.T, y)
    loss.backward()
    expected = (w0 - 0.1 * w_ref.grad) * keep
    cfg = TrainConfig(
        epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant"
    )
    result = train(model, mask, data, cfg, device=CPU, seed=0)
    assert result.iterations == 1
    assert torch.allclose(model.weight, expected, atol=1e-6)
    assert model.weight[0, 2].item() == 0.0 and model.weight[1, 0].item() == 0.0


def test_masked_weights_stay_exactly_zero_through_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g))
    keep = torch.rand(16, 10, generator=g) > 0.7
    mask = Mask({"0.weight": keep})
    before = model[0].weight.detach().clone()
    cfg = TrainConfig(epochs=5, batch_size=8, lr=0.5, momentum=0.9, weight_decay=1e-2)
    train(model, mask, data, cfg, device=CPU, seed=0)
    assert bool((model[0].weight[~keep] == 0).all())
    assert not torch.allclose(model[0].weight[keep], before[keep])


def test_capture_returns_the_weights_at_the_rewind_iteration() -> None:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))
    mask = Mask({"0.weight": torch.ones(8, 4, dtype=torch.bool)})
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.1, schedule="constant", momentum=0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    at_zero = train(model, mask, data, cfg, device=CPU, seed=5, capture_at=0).captured
    assert at_zero is not None and all(torch.equal(at_zero[k], init[k]) for k in init)
    model.load_state_dict(init)
    at_seven = train(model, mask, data, cfg, device=CPU, seed=5, capture_at=7).captured
    final = model.state_dict()
    assert iterations_per_epoch(40, 8) == 5
    assert at_seven is not None
    assert not torch.equal(at_seven["0.weight"], init["0.weight"])
    assert not torch.equal(at_seven["0.weight"], final["0.weight"])


def test_training_is_deterministic_given_the_seed_and_depends_on_it() -> None:
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        g = torch.Generator().manual_seed(3)
        data = TensorDataset(
            torch.randn(50, 4, generator=g), torch.randint(0, 2, (50,), generator=g)
        )
        mask = Mask({"0.weight": torch.ones(8, 4, dtype=torch.bool)})
        train(model, mask, data, TrainConfig(epochs=2, batch_size=10), device=CPU, seed=seed)
        return model[0].weight.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_resuming_from_an_iteration_equals_the_uninterrupted_run() -> None:
    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 2, (48,), generator=g))
    mask = Mask({"0.weight": torch.ones(8, 4, dtype=torch.bool)})
    cfg = TrainConfig(
        epochs=3, batch_size=8, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="cosine"
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    mid = train(model, mask, data, cfg, device=CPU, seed=9, capture_at=8).captured
    end_full = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    resumed.load_state_dict(mid)
    train(resumed, mask, data, cfg, device=CPU, seed=9, start_iteration=8)
    # Plain SGD carries no optimiser state, so continuing from iteration 8 is the same run.
    assert all(torch.allclose(resumed.state_dict()[k], end_full[k], atol=1e-6) for k in end_full)
    assert not torch.equal(init["0.weight"], end_full["0.weight"])


def test_learning_rate_schedules() -> None:
    cos = TrainConfig(lr=0.2, schedule="cosine")
    assert cos.lr_at(0, 100) == pytest.approx(0.2)
    assert cos.lr_at(50, 100) == pytest.approx(0.1)
    assert cos.lr_at(100, 100) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [step.lr_at(i, 100) for i in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    with pytest.raises(ConfigError):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError):
        TrainConfig(milestones=(1.5,))


def test_evaluate_counts_correct_predictions() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 5.0]])
    y = torch.tensor([0, 1, 1, 1, 0])
    assert evaluate(model, TensorDataset(x, y), CPU, batch_size=2) == pytest.approx(3 / 5)


def test_devices_and_seeds() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    assert derive_seed(0, "a") != derive_seed(1, "a") != derive_seed(0, "b")
    assert derive_seed(0, "a") == derive_seed(0, "a")


def test_masking_writes_exact_zeros_even_over_nan_and_inf() -> None:
    from ticketguard.tickets.training import MaskedParameters

    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(
            torch.tensor([[float("nan"), 1.0, float("inf")], [2.0, float("-inf"), 3.0]])
        )
    keep = torch.tensor([[False, True, False], [True, False, True]])
    MaskedParameters(model, Mask({"weight": keep})).apply()
    assert torch.equal(model.weight.detach(), torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]))


def test_training_does_not_disturb_the_callers_random_state() -> None:
    model, data = _toy()
    mask = Mask({"weight": torch.ones(2, 3, dtype=torch.bool)})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, mask, data, TrainConfig(epochs=2, batch_size=2), device=CPU, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_floored_raises_weak_entries_and_keeps_signs() -> None:
    weight = torch.tensor([0.5, -0.01, 0.0, -0.0, 0.02, -3.0])
    floor = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 0.1])
    out = floored(weight, floor)
    assert out.tolist() == pytest.approx([0.5, -0.1, 0.1, -0.1, 0.02, -3.0])
    assert torch.signbit(out).tolist() == [False, True, False, True, False, True]


def test_floors_hold_through_training_while_other_weights_move() -> None:
    """A weight the gradient drives towards zero stays at its floor; the mask still wins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g))
    keep = torch.rand(16, 10, generator=g) > 0.5
    carriers = keep & (torch.rand(16, 10, generator=g) > 0.5)
    floor = torch.where(carriers, 0.8, 0.0)
    start = model[0].weight.detach().clone()
    cfg = TrainConfig(epochs=5, batch_size=16, lr=0.5, weight_decay=0.1)
    train(
        model, Mask({"0.weight": keep}), data, cfg, device=CPU, seed=0, floors={"0.weight": floor}
    )
    w = model[0].weight.detach()
    assert (w[carriers].abs() >= 0.8 - 1e-6).all()
    assert (w[~keep] == 0).all()
    free = keep & ~carriers
    assert (w[free].abs() < 0.8).any()  # the floor binds only where it is set
    assert not torch.allclose(w[free], start[free])


def test_a_floor_must_fit_its_parameter() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="no parameter 'nope'"):
        MagnitudeFloor(model, {"nope": torch.zeros(2, 3)})
    with pytest.raises(ConfigError, match="floor shape"):
        MagnitudeFloor(model, {"weight": torch.zeros(3, 2)})
