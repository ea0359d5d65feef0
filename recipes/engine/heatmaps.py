"""`cope positions`: per-layer heatmaps of CoPE's contextual positions p_ij and attention.

One example is run through a trained model with recording on
(:func:`encoders.transformer.set_recording`); every attention layer gives its attention
weights and, for CoPE, its contextual positions, each (B, H, T, T). One PNG per layer shows,
per head, positions (top) and attention (bottom), with the recipe's
:meth:`~recipes.base.Recipe.example_signal` (spectrogram, frames or token labels) above them
and true event onsets marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recipes.base import UserError, pad_collate
from recipes.engine.evaluate import move_batch
from recipes.engine.runs import load_run


def record_example(model: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one batch with recording on; the recorded layers as CPU float tensors."""
    from encoders.transformer import recorded_layers, set_recording

    set_recording(model, True)
    try:
        with torch.no_grad():
            model(batch["inputs"], padding_mask=batch.get("padding_mask"))
        layers = recorded_layers(model)
    finally:
        set_recording(model, False)
    return [
        {
            key: None if value is None else value.detach().float().cpu()
            for key, value in layer.items()
        }
        for layer in layers
    ]


def _token_offset(tokens: int, signal: dict[str, Any] | None) -> float:
    """Extra tokens (a CLS token) before the signal's first token in the recorded maps."""
    if not signal or "image" not in signal:
        return tokens - len(signal.get("labels", [])) if signal else 0
    frames = signal["image"].shape[1] if signal["kind"] == "spectrogram" else len(signal["image"])
    signal_tokens = frames * float(signal.get("tokens_per_frame", 1.0))
    return max(0.0, round(tokens - signal_tokens))


def _draw_signal(axes: Any, signal: dict[str, Any], tokens: int, offset: float) -> None:
    import numpy as np

    kind = signal.get("kind")
    per_frame = float(signal.get("tokens_per_frame", 1.0))
    if kind == "spectrogram":
        image = np.asarray(signal["image"])
        right = offset + image.shape[1] * per_frame
        axes.imshow(
            image,
            aspect="auto",
            origin="lower",
            extent=(offset - 0.5, right - 0.5, 0, image.shape[0]),
        )
        axes.set_ylabel("feature")
    elif kind == "frames":
        frames = np.asarray(signal["image"])
        shown = frames[: min(len(frames), 32)]
        strip = np.concatenate(list(shown), axis=1) if len(shown) else np.zeros((1, 1))
        right = offset + len(shown) * per_frame
        axes.imshow(strip, aspect="auto", cmap="gray", extent=(offset - 0.5, right - 0.5, 0, 1))
        axes.set_yticks([])
    elif kind == "tokens":
        labels = list(signal.get("labels", []))
        axes.set_xticks([offset + index for index in range(len(labels))])
        axes.set_xticklabels(labels, fontsize=6, rotation=90)
        axes.set_yticks([])
    axes.set_xlim(-0.5, tokens - 0.5)
    for onset in signal.get("onsets", []) or []:
        axes.axvline(offset + onset, color="red", linewidth=0.8)
    axes.set_title(f"example signal ({kind})", fontsize=8)


def _label_tokens(axes: Any, labels: list[str], offset: float, tokens: int) -> None:
    """Token labels on both axes of a heatmap (every k-th one when there are many)."""
    step = max(1, -(-len(labels) // 24))
    ticks = [offset + index for index in range(0, len(labels), step)]
    shown = labels[::step]
    axes.set_xticks(ticks)
    axes.set_xticklabels(shown, fontsize=5, rotation=90)
    axes.set_yticks(ticks)
    axes.set_yticklabels(shown, fontsize=5)


def plot_layer(
    layer: dict[str, Any],
    index: int,
    signal: dict[str, Any] | None,
    path: Path,
    max_heads: int = 8,
) -> Path:
    """One layer's figure: positions and attention of each head of the first batch row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    attention = layer["attention"][0]  # (heads, queries, keys)
    positions = layer.get("positions")
    positions = positions[0] if positions is not None else None
    heads = min(attention.shape[0], max_heads)
    tokens = attention.shape[-1]
    offset = _token_offset(tokens, signal)
    # Token labels go on the heatmaps' axes; spectrograms and frames get a row of their own.
    labels = list(signal.get("labels", [])) if signal and signal.get("kind") == "tokens" else []
    signal_row = bool(signal) and not labels
    rows = (1 if signal_row else 0) + (1 if positions is not None else 0) + 1
    ratios = ([0.5] if signal_row else []) + [1] * (rows - (1 if signal_row else 0))
    figure, grid = plt.subplots(
        rows,
        heads,
        figsize=(2.8 * heads + 0.6, 2.6 * rows),
        squeeze=False,
        gridspec_kw={"height_ratios": ratios},
    )
    row = 0
    if signal_row:
        for column in range(heads):
            _draw_signal(grid[0][column], signal, tokens, offset)
            # an invisible colorbar gives the signal the heatmaps' width, so columns line up
            spacer = figure.colorbar(ScalarMappable(), ax=grid[0][column], fraction=0.046, pad=0.02)
            spacer.ax.set_visible(False)
        row = 1
    onsets = [offset + onset for onset in (signal or {}).get("onsets", []) or []]
    maps = ([("positions p_ij", positions, "viridis")] if positions is not None else []) + [
        ("attention", attention, "magma")
    ]
    for name, values, colormap in maps:
        for head in range(heads):
            axes = grid[row][head]
            data = values[head]
            # Attention of the first causal query is 1 and would wash out the scale: clip at
            # the 99th percentile of the map.
            vmax = (
                float(torch.quantile(data.flatten()[:1_000_000], 0.99))
                if name == "attention"
                else None
            )
            image = axes.imshow(data.numpy(), cmap=colormap, aspect="auto", vmax=vmax)
            for onset in onsets:
                axes.axvline(onset, color="red", linewidth=0.5, alpha=0.7)
            axes.set_title(f"layer {index} head {head}: {name}", fontsize=8)
            axes.set_xlabel("key j", fontsize=7)
            axes.set_ylabel("query i", fontsize=7)
            if labels:
                _label_tokens(axes, labels, offset, tokens)
            figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02)
        row += 1
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_positions(
    run_dir: Path,
    *,
    example: int = 0,
    split: str = "val",
    out_dir: Path | None = None,
    device: str = "cpu",
) -> tuple[list[Path], dict[str, Any]]:
    """Heatmaps of one example for every layer; returns the PNG paths and a summary."""
    loaded = load_run(run_dir, device=device)
    splits = loaded.bundle.splits
    if split == "train":
        dataset = loaded.bundle.train
    elif split in splits:
        dataset = splits[split].dataset
    else:
        raise UserError(f"unknown split {split!r}; this recipe has: train, {', '.join(splits)}")
    size = len(dataset)  # type: ignore[arg-type]
    if not 0 <= example < size:
        raise UserError(f"--example must be 0 to {size - 1} for split {split!r}, got {example}")
    item = dataset[example]
    batch = move_batch((loaded.bundle.collate or pad_collate)([item]), loaded.device)
    try:
        layers = record_example(loaded.model, batch)
    except ImportError as error:
        raise UserError(f"this model cannot record attention ({error})") from None
    if not layers:
        raise UserError(f"the model of {run_dir} has no attention layers that record")
    signal = loaded.recipe.example_signal(item, loaded.bundle.info)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "positions"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_layer(layer, index, signal, out_dir / f"{split}-{example}-layer{index}.png")
        for index, layer in enumerate(layers)
    ]
    summary = {
        "pe": loaded.config["model.pe"],
        "layers": len(layers),
        "tokens": int(layers[0]["attention"].shape[-1]),
        "has_positions": layers[0].get("positions") is not None,
        "max_position": [
            float(layer["positions"].abs().max()) if layer.get("positions") is not None else None
            for layer in layers
        ],
    }
    return paths, summary
