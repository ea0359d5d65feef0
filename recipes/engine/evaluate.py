"""Loss and accuracy over the answers a batch asks for (targets of -100 are not asked)."""

from __future__ import annotations

import re
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


def item_batches(dataset: Dataset, batch_size: int) -> Iterator[list[Any]]:
    """The items of a dataset in order, in lists of ``batch_size`` (evaluation needs no
    shuffling)."""
    size = len(dataset)  # type: ignore[arg-type]
    for start in range(0, size, batch_size):
        yield [dataset[index] for index in range(start, min(start + batch_size, size))]


def answers_per_row(logits: Tensor, targets: Tensor) -> tuple[list[int], list[int]]:
    """Correct and asked answers of each batch row: one answer per row, or one per token."""
    targets = torch.as_tensor(targets, device=logits.device).long()
    asked = targets != IGNORE_INDEX
    right = (logits.argmax(-1) == targets) & asked
    token_dims = tuple(range(1, targets.dim()))
    if token_dims:
        right, asked = right.sum(token_dims), asked.sum(token_dims)
    return right.long().tolist(), asked.long().tolist()


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
    question_of: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """Accuracy, mean loss and number of answers of ``model`` on ``dataset``.

    With ``question_of`` (an item's question name, :meth:`recipes.base.Recipe.question_of`),
    also ``questions``: {name: {"correct", "count"}} from the same forward passes.
    """
    was_training = model.training
    model.eval()
    collate = collate or pad_collate
    total_loss, correct, count = 0.0, 0, 0
    per_question: dict[str, dict[str, int]] = {}
    size = len(dataset)  # type: ignore[arg-type]
    try:
        for index, items in enumerate(item_batches(dataset, batch_size)):
            batch = move_batch(collate(items), device)
            with autocast_context(device, precision):
                logits = forward_batch(model, batch)
            loss, batch_correct, batch_count = loss_and_counts(logits, batch["targets"])
            total_loss += float(loss) * batch_count
            correct, count = correct + batch_correct, count + batch_count
            if question_of is not None:
                rows = zip(*answers_per_row(logits, batch["targets"]), strict=True)
                for item, (row_correct, row_count) in zip(items, rows, strict=True):
                    name = question_of(item)
                    if name is not None:
                        tally = per_question.setdefault(name, {"correct": 0, "count": 0})
                        tally["correct"] += row_correct
                        tally["count"] += row_count
            if on_batch is not None:
                on_batch(min((index + 1) * batch_size, size), size)
    finally:
        model.train(was_training)
    result: dict[str, Any] = {
        "accuracy": correct / count if count else float("nan"),
        "loss": total_loss / count if count else float("nan"),
        "count": count,
    }
    if question_of is not None:
        ordered = sorted(per_question, key=natural_key)
        result["questions"] = {name: per_question[name] for name in ordered}
    return result


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value ("n=2" before "n=10")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def metric_value(accuracy: float, metric: str) -> float:
    """What tables show: accuracy (0-1) or error in percent."""
    return (1.0 - accuracy) * 100.0 if metric == "error" else accuracy


def metric_label(metric: str) -> str:
    """Column header for a recipe's metric."""
    return "error %" if metric == "error" else "accuracy"
