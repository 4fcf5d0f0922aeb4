"""Architectures: a registry of models for small and CIFAR-sized inputs, torchvision, and user factories.

An architecture is named by a string:
- a registry name (`digits_cnn`, `resnet20`, `resnet18_cifar`, `vgg16_cifar`);
- `torchvision:NAME` (or a bare NAME) for every torchvision classification model;
- `package.module:factory` for a user's own model: `factory(num_classes=..., **kwargs)`.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ticketguard.errors import ArchitectureError, ConfigError

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --- Models --------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits; conv2 has a 64x32 and conv3 a 64x64 channel matrix."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        w1, w2 = width, 2 * width
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, w2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(4 * w2, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.pool(F.relu(self.bn3(self.conv3(x))))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc(x)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, out_channels: int, in_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class BasicBlock(nn.Module):
    """The two-conv residual block of CIFAR ResNets, with option-A or option-B shortcuts."""

    def __init__(self, in_planes: int, planes: int, stride: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(planes, in_planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem, residual stages, global pooling, a linear classifier."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        option: str,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, option))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.ModuleList(stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.layers:
            x = stage(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016) with option-A shortcuts: 0.27M parameters."""
    return CifarResNet([3, 3, 3], [16, 32, 64], "A", num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, 1x1-conv shortcuts."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], "B", num_classes, in_channels)


VGG16_LAYOUT = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """VGG with batch normalisation for 32x32 inputs and a single linear classifier."""

    def __init__(self, layout: Sequence[int | str], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def vgg16_cifar(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with batch normalisation for CIFAR."""
    return VGG(VGG16_LAYOUT, num_classes, in_channels)


# --- Registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: how to build it and the input it expects by default."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("digits_cnn", DigitsCNN, (1, 8, 8), "small CNN for 8x8 digits"),
        Architecture("resnet20", resnet20, (3, 32, 32), "CIFAR ResNet-20, option-A shortcuts"),
        Architecture("resnet18_cifar", resnet18_cifar, (3, 32, 32), "CIFAR-style ResNet-18"),
        Architecture("vgg16_cifar", vgg16_cifar, (3, 32, 32), "VGG-16 with BN for CIFAR"),
    ]
}


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def is_import_path(arch: str) -> bool:
    """Whether `arch` names a user factory (`package.module:factory`) rather than a known model."""
    return ":" in arch and not arch.startswith("torchvision:")


def known_architectures() -> list[str]:
    """Return the registry names (torchvision names are accepted too)."""
    return sorted(REGISTRY)


def build_model(
    arch: str,
    num_classes: int,
    kwargs: dict[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> nn.Module:
    """Build an untrained model by architecture name.

    Import paths run the user's code, so they are built only with `allow_import=True` (the user
    typed the path); an import path read from a file is never followed silently.
    """
    kwargs = dict(kwargs or {})
    factory = _resolve(arch, allow_import)
    _check_size(arch, factory, num_classes, kwargs)
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a factory may fail in any way; say which and why
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchitectureError(f"cannot build {arch!r} with {kwargs}: {detail}") from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{arch!r} returned a {type(model).__name__}, not a torch module")
    return model


def _resolve(arch: str, allow_import: bool) -> Callable[..., nn.Module]:
    """Return the factory an architecture name stands for, or raise ArchitectureError."""
    if arch in REGISTRY:
        factory: Callable[..., nn.Module] = REGISTRY[arch].factory
    elif is_import_path(arch):
        if not allow_import:
            raise ArchitectureError(
                f"architecture {arch!r} is an import path recorded in a file; it is not imported "
                "unless you name it yourself with --arch (that runs the module's code)"
            )
        factory = _import_factory(arch)
    elif arch.removeprefix("torchvision:") in _torchvision_names():
        import torchvision.models as tvm

        factory = functools.partial(tvm.get_model, arch.removeprefix("torchvision:"), weights=None)
    else:
        raise ArchitectureError(
            f"unknown architecture {arch!r} (known: {', '.join(known_architectures())}, "
            "any torchvision classification model, or package.module:factory)"
        )
    return factory


# --- Size budget ---------------------------------------------------------------------------------

#: Most parameters plus buffers a model built by ticketguard may hold: 200 M values are 800 MB in
#: float32, so the model, the file it came from and a copy for evaluation stay within a few GB. The
#: largest registry model (VGG-16) has 15 M; torchvision's ViT-L/H and RegNetY-128GF exceed it.
MAX_MODEL_PARAMETERS = 200_000_000
#: Most tensor-creating calls a size probe lets a factory make (a ResNet-152 makes about 1,000);
#: bounds the time of a probe of an architecture whose keywords ask for millions of layers.
MAX_PROBE_ALLOCATIONS = 50_000
#: Tensors of at least this many values are created on the meta device in the fallback probe
#: (smaller ones stay real, for factories that compute their layout with tensor arithmetic).
_PROBE_META_THRESHOLD = 4096

_SIZED_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn)


class _ProbeExceeded(Exception):
    """Raised inside a size probe once the factory asks for more than the budget."""


def _requested_values(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size: Any = kwargs.get("size")
    if size is None:
        if func is torch.full:
            size = args[0] if args else ()
        elif len(args) == 1 and isinstance(args[0], Sequence):
            size = args[0]
        else:
            size = args
    count = 1
    try:
        for d in size:
            count *= int(d)
    except (TypeError, ValueError):
        return 0
    return count


class _SizeProbe(TorchFunctionMode):
    """Count the values a factory allocates; put large (or all) allocations on the meta device."""

    def __init__(self, threshold: int | None):
        super().__init__()
        self.threshold = threshold
        self.calls = 0
        self.values = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in _SIZED_FACTORIES or func is torch.full:
            n = _requested_values(func, args, kwargs)
            self.calls += 1
            self.values += n
            if self.calls > MAX_PROBE_ALLOCATIONS or self.values > 2 * MAX_MODEL_PARAMETERS:
                raise _ProbeExceeded
            if self.threshold is not None and n >= self.threshold and kwargs.get("device") is None:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _probe(factory: Callable[..., nn.Module], num_classes: int, kwargs: dict[str, Any]) -> Any:
    """Build the model without allocating its weights; None when the factory needs real tensors.

    First everything on the meta device; failing that (factories that compute their layout with
    tensor arithmetic, like torchvision's RegNets), only the large tensors, with the random
    generator restored afterwards so the real build draws the same initial weights.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _SizeProbe(None), torch.device("meta"):
                return factory(num_classes=num_classes, **kwargs)
        except _ProbeExceeded:
            raise
        except Exception:  # noqa: BLE001 - retried below, then left to the real build
            pass
        try:
            with torch.random.fork_rng(devices=[]), _SizeProbe(_PROBE_META_THRESHOLD):
                return factory(num_classes=num_classes, **kwargs)
        except _ProbeExceeded:
            raise
        except Exception:  # noqa: BLE001 - the real build reports why it fails
            return None


def model_size(model: nn.Module) -> int:
    """Parameters plus buffers: the values the model's state dict holds."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def _check_size(
    arch: str, factory: Callable[..., nn.Module], num_classes: int, kwargs: dict[str, Any]
) -> nn.Module | None:
    """Refuse, before building it for real, a model larger than MAX_MODEL_PARAMETERS.

    Returns the probe (a model whose large tensors are on the meta device), or None when the
    factory could not be probed (then the real build decides).
    """
    too_big = ArchitectureError(
        f"{arch!r} with {kwargs} and {num_classes} classes has more than "
        f"{MAX_MODEL_PARAMETERS:,} parameters (the budget); refused"
    )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ArchitectureError(f"cannot build {arch!r}: num_classes must be a positive integer")
    try:
        probe = _probe(factory, num_classes, kwargs)
    except _ProbeExceeded:
        raise too_big from None
    if isinstance(probe, nn.Module) and model_size(probe) > MAX_MODEL_PARAMETERS:
        raise too_big
    return probe if isinstance(probe, nn.Module) else None


def probe_model(
    arch: str,
    num_classes: int,
    kwargs: dict[str, Any] | None = None,
    *,
    allow_import: bool = False,
) -> nn.Module:
    """Build `arch` without allocating its weights (names and shapes only), under the budget.

    Falls back to a real build for a factory that cannot be probed.
    """
    kwargs = dict(kwargs or {})
    factory = _resolve(arch, allow_import)
    probe = _check_size(arch, factory, num_classes, kwargs)
    if probe is not None:
        return probe
    return build_model(arch, num_classes, kwargs, allow_import=allow_import)


def _import_factory(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import {module_name!r} for {path!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(f"{path!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def check_architecture(arch: str) -> None:
    """Raise ArchitectureError if `arch` is not a name build_model could resolve."""
    if arch in REGISTRY or is_import_path(arch):
        return
    if arch.removeprefix("torchvision:") in _torchvision_names():
        return
    build_model(arch, 10)  # raises with the list of known names


def default_input_shape(arch: str) -> tuple[int, int, int] | None:
    """Return the registry's default input shape, or None when the architecture has none."""
    entry = REGISTRY.get(arch)
    return entry.input_shape if entry else None


# --- Prunable layers -----------------------------------------------------------------------------


def prunable_parameters(model: nn.Module) -> list[str]:
    """Return the names of every conv and linear weight, in module registration order."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES) and getattr(module, "weight", None) is not None
    ]


def default_pruned_parameters(model: nn.Module) -> list[str]:
    """Return every conv and linear weight except the first conv and the final classifier."""
    convs = [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]
    classifier = classifier_name(model)
    excluded = set(convs[:1]) | ({classifier} if classifier else set())
    return [n for n in prunable_parameters(model) if n not in excluded]


def classifier_name(model: nn.Module) -> str | None:
    """Return the weight name of the final classifier: the last linear layer, if any."""
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def classifier_width(model: nn.Module) -> int | None:
    """Return the number of outputs of the final classifier, if the model has a linear one."""
    name = classifier_name(model)
    return int(model.get_parameter(name).shape[0]) if name else None


def select_parameters(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Resolve layer patterns (exact names or fnmatch globs) to prunable weight names."""
    if not patterns:
        return default_pruned_parameters(model)
    prunable = prunable_parameters(model)
    chosen: list[str] = []
    for pattern in patterns:
        candidates = [pattern, f"{pattern}.weight"]
        matched = [n for n in prunable if any(fnmatch.fnmatchcase(n, c) for c in candidates)]
        if not matched:
            raise ConfigError(
                f"layer pattern {pattern!r} matches no conv or linear weight "
                f"(prunable: {', '.join(prunable[:8])}{', ...' if len(prunable) > 8 else ''})"
            )
        chosen += [n for n in matched if n not in chosen]
    return [n for n in prunable if n in chosen]
