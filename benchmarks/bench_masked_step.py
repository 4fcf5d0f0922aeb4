"""Cost of keeping weights exactly sparse: a masked training step vs. an unmasked one.

ResNet-20, batch 128, CPU. Both runs go through the real trainer (`ticketguard.tickets.training.train`);
the masked run applies a 90%-sparse mask in place after every optimiser step, the unmasked run an
empty mask. Runs alternate so drift in machine load hits both; the figure is the ratio of medians.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.data import TensorDataset

from ticketguard.tickets.mask import Mask
from ticketguard.tickets.models import build_model, default_pruned_parameters
from ticketguard.tickets.training import MaskedParameters, TrainConfig, train

STEPS = 8
REPEATS = 7
BATCH = 128


def _run(mask_density: float | None, data: TensorDataset) -> float:
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    params = dict(model.named_parameters())
    if mask_density is None:
        mask = Mask({})
    else:
        g = torch.Generator().manual_seed(1)
        mask = Mask(
            {
                n: torch.rand(params[n].shape, generator=g) < mask_density
                for n in default_pruned_parameters(model)
            }
        )
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=0.1)
    start = time.perf_counter()
    train(model, mask, data, config, device=torch.device("cpu"), seed=0)
    return (time.perf_counter() - start) / STEPS


def main() -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(BATCH * STEPS, 3, 32, 32, generator=g),
        torch.randint(0, 10, (BATCH * STEPS,), generator=g),
    )
    _run(None, data)  # warm-up
    plain, masked = [], []
    for _ in range(REPEATS):
        plain.append(_run(None, data))
        masked.append(_run(0.1, data))
    p, m = statistics.median(plain), statistics.median(masked)
    apply_ms = _apply_cost()
    print(
        f"masked training step, ResNet-20, batch {BATCH}, CPU ({torch.get_num_threads()} threads)"
    )
    print(f"  unmasked step: {1000 * p:8.1f} ms (median of {REPEATS} runs of {STEPS} steps)")
    print(f"  masked step:   {1000 * m:8.1f} ms")
    print(f"  ratio masked/unmasked: {m / p:.3f}  (target <= 1.05)")
    print(
        f"  in-place mask application alone: {apply_ms:.3f} ms per step "
        f"(implied ratio {1 + apply_ms / (1000 * p):.4f})"
    )
    return {"unmasked_ms": 1000 * p, "masked_ms": 1000 * m, "ratio": m / p, "apply_ms": apply_ms}


def _apply_cost(calls: int = 200) -> float:
    """Time the in-place multiply that keeps weights sparse, alone (it is all the masked step adds)."""
    model = build_model("resnet20", 10)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    mask = Mask(
        {
            n: torch.rand(params[n].shape, generator=g) < 0.1
            for n in default_pruned_parameters(model)
        }
    )
    masked = MaskedParameters(model, mask)
    masked.apply()
    start = time.perf_counter()
    for _ in range(calls):
        masked.apply()
    return 1000 * (time.perf_counter() - start) / calls


if __name__ == "__main__":
    main()
