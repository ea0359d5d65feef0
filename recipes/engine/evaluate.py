"""Loss and accuracy over the answers a batch asks for (targets of -100 are not asked)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from recipes.base import IGNORE_INDEX, pad_collate
from recipes.engine.precision import autocast_context


def move_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to ``device``."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        for key, value in batch.items()
    }


def forward_batch(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits of one batch: (B, classes) or (B, T, classes)."""
    return model(batch["inputs"], padding_mask=batch.get("padding_mask"))


def answer_count(targets: Tensor) -> int:
    """How many answers a batch asks (targets other than IGNORE_INDEX).

    Read it from the batch before it moves to the device: then counting costs no host sync.
    """
    return int((torch.as_tensor(targets) != IGNORE_INDEX).sum())


def answer_loss(logits: Tensor, targets: Tensor, count: int) -> Tensor:
    """Mean cross-entropy over the ``count`` asked answers, without a host sync."""
    flat_logits, flat_targets = _flat_answers(logits, targets)
    summed = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / max(count, 1)


def loss_and_counts(logits: Tensor, targets: Tensor) -> tuple[Tensor, int, int]:
    """Mean cross-entropy over asked answers, number correct and number asked."""
    flat_logits, flat_targets = _flat_answers(logits, targets)
    asked = flat_targets != IGNORE_INDEX
    count = int(asked.sum())
    loss = answer_loss(flat_logits, flat_targets, count)
    correct = int((flat_logits.argmax(-1)[asked] == flat_targets[asked]).sum())
    return loss, correct, count


def _flat_answers(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(N, classes) float logits and (N,) long targets of a batch whose lengths agree."""
    targets = torch.as_tensor(targets, device=logits.device).long()
    if (
        logits.dim() == targets.dim() + 1
        and logits.dim() > 2
        and logits.shape[1] != targets.shape[1]
    ):
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree in length"
        )
    return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)


def iterate_batches(
    dataset: Dataset, collate: Callable[[list[Any]], dict[str, Any]] | None, batch_size: int
) -> Iterator[dict[str, Any]]:
    """Batches of a dataset in order (evaluation needs no shuffling)."""
    collate = collate or pad_collate
    size = len(dataset)  # type: ignore[arg-type]
    for start in range(0, size, batch_size):
        yield collate([dataset[index] for index in range(start, min(start + batch_size, size))])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]] | None,
    *,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    """Accuracy, mean loss and number of answers of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    size = len(dataset)  # type: ignore[arg-type]
    try:
        for index, batch in enumerate(iterate_batches(dataset, collate, batch_size)):
            batch = move_batch(batch, device)
            with autocast_context(device, precision):
                logits = forward_batch(model, batch)
            loss, batch_correct, batch_count = loss_and_counts(logits, batch["targets"])
            total_loss += float(loss) * batch_count
            correct, count = correct + batch_correct, count + batch_count
            if on_batch is not None:
                on_batch(min((index + 1) * batch_size, size), size)
    finally:
        model.train(was_training)
    return {
        "accuracy": correct / count if count else float("nan"),
        "loss": total_loss / count if count else float("nan"),
        "count": count,
    }


def metric_value(accuracy: float, metric: str) -> float:
    """What tables show: accuracy (0-1) or error in percent."""
    return (1.0 - accuracy) * 100.0 if metric == "error" else accuracy


def metric_label(metric: str) -> str:
    """Column header for a recipe's metric."""
    return "error %" if metric == "error" else "accuracy"
