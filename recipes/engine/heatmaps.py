"""`cope positions`: per-layer heatmaps of CoPE's contextual positions p_ij and attention.

One example is run through a trained model with recording on
(:func:`encoders.transformer.set_recording`); every attention layer gives its attention
weights and, for CoPE, its contextual positions, each (B, H, T, T). One PNG per layer shows,
per head, positions (top) and attention (bottom), with the recipe's
:meth:`~recipes.base.Recipe.example_signal` (spectrogram, frames or token labels) above them
and true event onsets marked.

For CoPE on a signal with onsets it also draws ``gates`` PNG: the readout query's gates and
positions over the tokens, per layer and head, beside the signal with the onsets marked, and
scores how well the positions' increments fall on onsets (:mod:`recipes.engine.alignment`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from recipes.base import UserError, pad_collate
from recipes.engine.evaluate import move_batch
from recipes.engine.runs import load_run
from recipes.files import write_atomic


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


def _token_offset(tokens: int, signal: dict[str, Any] | None, trailing: int = 0) -> float:
    """Extra tokens (a CLS token) before the signal's first token in the recorded maps.

    ``trailing``: tokens after the signal (a causal classifier's readout token).
    """
    tokens -= trailing
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
    trailing: int = 0,
) -> Path:
    """One layer's figure: positions and attention of each head of the first batch row.

    ``trailing``: tokens after the signal (a causal readout), so onsets are placed right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    attention = layer["attention"][0]  # (heads, queries, keys)
    positions = layer.get("positions")
    positions = positions[0] if positions is not None else None
    heads = min(attention.shape[0], max_heads)
    tokens = attention.shape[-1]
    offset = _token_offset(tokens, signal, trailing)
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
    write_atomic(path, lambda stream: figure.savefig(stream, dpi=110, format="png"))
    plt.close(figure)
    return path


def readout_trailing(loaded: Any) -> int:
    """1 when the model appends a readout token after the signal (causal CLS classifier)."""
    from encoders.transformer import SequenceClassifier

    config = loaded.config
    causal_readout = config.get("model.causal") and config.get("model.pooling", "cls") == "cls"
    return 1 if causal_readout and isinstance(loaded.model, SequenceClassifier) else 0


def alignment_of_layers(
    layers: list[dict[str, Any]], signal: dict[str, Any] | None, *, causal: bool, trailing: int
) -> list[list[dict[str, Any]]] | None:
    """Per layer and head, the readout query's event alignment; None without onsets/positions."""
    from recipes.engine.alignment import layer_alignment

    if not signal or not signal.get("onsets") or layers[0].get("positions") is None:
        return None
    tokens = layers[0]["positions"].shape[-1]
    offset = int(_token_offset(tokens, signal, trailing))
    return [
        layer_alignment(
            layer["positions"][0],
            signal["onsets"],
            offset=offset,
            signal_tokens=tokens - offset - trailing,
            causal=causal,
        )
        for layer in layers
    ]


def plot_gates_over_time(
    layers: list[dict[str, Any]],
    signal: dict[str, Any],
    path: Path,
    *,
    causal: bool,
    trailing: int = 0,
    alignment: list[list[dict[str, Any]]] | None = None,
    max_heads: int = 8,
) -> Path:
    """The readout query's gates and positions over the tokens, per layer, under the signal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recipes.engine.alignment import readout_query

    tokens = layers[0]["positions"].shape[-1]
    offset = _token_offset(tokens, signal, trailing)
    query = readout_query(tokens, causal=causal)
    onsets = [offset + onset for onset in signal.get("onsets", []) or []]
    rows = 1 + 2 * len(layers)
    figure, grid = plt.subplots(
        rows, 1, figsize=(10, 1.6 * rows + 0.5), squeeze=False, sharex=True,
        gridspec_kw={"height_ratios": [1.2] + [1] * (rows - 1)},
    )  # fmt: skip
    _draw_signal(grid[0][0], signal, tokens, offset)
    steps = range(tokens)
    for index, layer in enumerate(layers):
        gates = layer.get("gates")
        for row, (name, values) in enumerate(
            (("gates g", gates), ("positions p", layer["positions"]))
        ):
            axes = grid[1 + 2 * index + row][0]
            if values is None:
                axes.text(0.5, 0.5, "not recorded", ha="center", transform=axes.transAxes)
                continue
            for head in range(min(values.shape[1], max_heads)):
                label = f"head {head}"
                if alignment is not None and row == 1:
                    score = alignment[index][head]
                    label += f" (align {score['precision']:.2f}, recall {score['recall']:.2f})"
                axes.plot(steps, values[0, head, query].numpy(), linewidth=0.9, label=label)
            for onset in onsets:
                axes.axvline(onset, color="red", linewidth=0.6, alpha=0.7)
            axes.set_ylabel(f"L{index} {name}", fontsize=7)
            if row == 1:
                axes.legend(fontsize=5, loc="best", ncol=2)
    grid[-1][0].set_xlabel(f"key j (query {query}: the readout); red: true onsets", fontsize=7)
    grid[-1][0].set_xlim(-0.5, tokens - 0.5)
    figure.tight_layout()
    write_atomic(path, lambda stream: figure.savefig(stream, dpi=110, format="png"))
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
    trailing = readout_trailing(loaded)
    causal = bool(loaded.config.get("model.causal"))
    paths = [
        plot_layer(
            layer, index, signal, out_dir / f"{split}-{example}-layer{index}.png", trailing=trailing
        )
        for index, layer in enumerate(layers)
    ]
    alignment = alignment_of_layers(layers, signal, causal=causal, trailing=trailing)
    if alignment is not None:
        paths.append(
            plot_gates_over_time(
                layers,
                signal,
                out_dir / f"{split}-{example}-gates.png",
                causal=causal,
                trailing=trailing,
                alignment=alignment,
            )
        )
    summary = {
        "pe": loaded.config["model.pe"],
        "layers": len(layers),
        "tokens": int(layers[0]["attention"].shape[-1]),
        "has_positions": layers[0].get("positions") is not None,
        "max_position": [
            float(layer["positions"].abs().max()) if layer.get("positions") is not None else None
            for layer in layers
        ],
        "alignment": alignment,  # per layer, per head: precision (the score), recall, counts
    }
    return paths, summary
