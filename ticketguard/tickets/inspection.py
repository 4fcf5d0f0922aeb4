"""Describe any loadable model file: architecture, sparsity, fingerprint, metadata, accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ticketguard.errors import DatasetError
from ticketguard.tickets.loading import load_checkpoint, load_model, observed_mask
from ticketguard.tickets.models import classifier_width, is_import_path, prunable_parameters


def inspect_file(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    eval_dataset: str | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Return a JSON-ready report of what the file holds (and its accuracy when asked).

    An architecture given here was typed by the user, so an import path is allowed; one recorded
    in the file is only built if it is a registry or torchvision name.
    """
    loaded = load_checkpoint(path)
    model = None
    recorded = loaded.architecture
    if arch is not None:
        model = load_model(loaded, arch, arch_kwargs=arch_kwargs, allow_import=True)
    elif recorded is not None and is_import_path(recorded):
        loaded.notes.append(
            f"architecture {recorded} is an import path recorded in the file; it was not imported "
            "(name it yourself with --arch to build the model)"
        )
    elif recorded is not None:
        model = load_model(loaded, arch_kwargs=arch_kwargs)
    if loaded.mask is not None:
        mask, source = observed_mask(loaded)
    elif model is not None:
        mask, source = observed_mask(loaded, prunable_parameters(model))
    else:
        mask, source = observed_mask(loaded)
        loaded.notes.append(
            "architecture unknown: every floating tensor with 2-5 dimensions counted as prunable"
        )
    report: dict[str, Any] = {
        "path": str(loaded.path),
        "format": loaded.source_format,
        "architecture": arch or recorded,
        "num_classes": loaded.metadata.get("num_classes"),
        "parameters": {
            "model": sum(p.numel() for p in model.parameters()) if model is not None else None,
            "values": sum(v.numel() for v in loaded.state.values() if v.is_floating_point()),
            "tensors": len(loaded.state),
        },
        "mask_source": source,
        "sparsity": mask.report(),
        "fingerprint": mask.fingerprint(),
        "metadata": loaded.metadata,
        "notes": loaded.notes,
    }
    if model is not None and report["num_classes"] is None:
        report["num_classes"] = classifier_width(model)
    if eval_dataset is not None:
        report["evaluation"] = _evaluate(
            model, eval_dataset, loaded.metadata, data_dir, download, device
        )
    return report


def _evaluate(
    model: Any,
    dataset: str,
    metadata: Mapping[str, Any],
    data_dir: str | Path | None,
    download: bool,
    device: str,
) -> dict[str, Any]:
    from ticketguard.tickets.data import load_data
    from ticketguard.tickets.training import evaluate, resolve_device

    if model is None:
        raise DatasetError("--eval needs the architecture: the file records none, so pass --arch")
    split_seed = int((metadata.get("dataset") or {}).get("split_seed", 0))
    splits = load_data(dataset, data_dir, download=download, split_seed=split_seed, augment=False)
    dev = resolve_device(device)
    model.to(dev)
    try:
        accuracy = evaluate(model, splits.test, dev)
    except RuntimeError as exc:
        raise DatasetError(
            f"the model cannot take {dataset!r} inputs {splits.input_shape}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return {
        "dataset": dataset,
        "split": "test",
        "samples": len(splits.test),
        "accuracy": accuracy,
        "split_seed": split_seed,
    }
