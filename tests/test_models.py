"""The architecture registry and the choice of prunable layers."""

from __future__ import annotations

import sys

import pytest
import torch

from ticketguard.errors import ArchitectureError, ConfigError
from ticketguard.tickets.models import (
    build_model,
    default_pruned_parameters,
    prunable_parameters,
    select_parameters,
)


def test_resnet20_matches_the_paper_counts() -> None:
    model = build_model("resnet20", 10)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == 269_722
    pruned = default_pruned_parameters(model)
    assert "conv1.weight" not in pruned and "fc.weight" not in pruned
    assert sum(params[n].numel() for n in pruned) == 267_264
    assert sum(params[n].shape[0] * params[n].shape[1] for n in pruned) == 29_696
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("arch", "shape", "classes"),
    [
        ("digits_cnn", (1, 8, 8), 10),
        ("resnet18_cifar", (3, 32, 32), 100),
        ("vgg16_cifar", (3, 32, 32), 10),
        ("torchvision:resnet18", (3, 64, 64), 7),
        ("mobilenet_v3_small", (3, 64, 64), 5),
    ],
)
def test_registry_models_build_and_run(arch: str, shape: tuple[int, ...], classes: int) -> None:
    model = build_model(arch, classes).eval()
    assert model(torch.randn(2, *shape)).shape == (2, classes)


def test_digits_cnn_has_a_channel_matrix_large_enough_for_a_qr_code() -> None:
    model = build_model("digits_cnn", 10)
    shapes = [model.get_parameter(n).shape for n in default_pruned_parameters(model) if "conv" in n]
    assert any(s[0] >= 64 and s[1] >= 32 for s in shapes)
    assert default_pruned_parameters(model) == ["conv2.weight", "conv3.weight", "fc1.weight"]


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ArchitectureError, match="unknown architecture 'nosuchnet'.*resnet20"):
        build_model("nosuchnet", 10)


def test_import_paths_need_explicit_permission(tmp_path, monkeypatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=10, hidden=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ArchitectureError, match="import path"):
        build_model("mymodels:tiny", 3)
    assert "mymodels" not in sys.modules
    model = build_model("mymodels:tiny", 3, {"hidden": 7}, allow_import=True)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)
    assert prunable_parameters(model) == ["1.weight", "3.weight"]
    with pytest.raises(ArchitectureError, match="no callable"):
        build_model("mymodels:missing", 3, allow_import=True)


def test_select_parameters_by_name_and_glob() -> None:
    model = build_model("resnet20", 10)
    assert select_parameters(model, ["layers.0.*"]) == [
        f"layers.0.{b}.conv{c}.weight" for b in range(3) for c in (1, 2)
    ]
    assert select_parameters(model, ["fc"]) == ["fc.weight"]
    assert select_parameters(model, None) == default_pruned_parameters(model)
    with pytest.raises(ConfigError, match="matches no conv or linear"):
        select_parameters(model, ["bn1"])
