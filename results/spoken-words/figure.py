"""Draw one `spoken-words` clip at the training rate and the same words slowed, with boundaries.

Run from the repository root: ``python results/spoken-words/figure.py [OUT.png]``. The word bank
is cached under a temporary folder unless COPE_CACHE_DIR is set.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from encoders.frontends import AudioFeatures  # noqa: E402
from recipes.spoken_words import WordSettings, plan_clip, render_clip, word_bank  # noqa: E402

INDEX = 3  # a test clip with four words


def draw(out: Path, root: Path) -> None:
    settings = WordSettings(words=(4, 4))
    slow = dataclasses.replace(settings, rate=settings.slow_rate)
    plans = {"training rate": plan_clip(settings, "test", INDEX)}
    plans["slow (same words, about half the rate)"] = plan_clip(slow, "test", INDEX)
    utterances = [u for plan in plans.values() for u in plan.utterances]
    bank = word_bank(root, settings.vocabulary, utterances, settings.sample_rate)
    analyzer = AudioFeatures(settings.sample_rate, "logmel", settings.n_mels)
    rendered = {title: render_clip(plan, bank) for title, plan in plans.items()}
    longest = max(wave.shape[0] for wave, _ in rendered.values()) / settings.sample_rate
    figure, axes = plt.subplots(4, 1, figsize=(11, 7.5), sharex=True)
    for row, ((title, (wave, words)), plan) in enumerate(
        zip(rendered.items(), plans.values(), strict=True)
    ):
        seconds = torch.arange(wave.shape[0]) / settings.sample_rate
        wave_axis, mel_axis = axes[2 * row], axes[2 * row + 1]
        wave_axis.plot(seconds, wave, linewidth=0.4, color="0.25")
        wave_axis.set_ylabel("waveform")
        wave_axis.set_title(title, loc="left", fontsize=10)
        with torch.no_grad():
            mel = analyzer(wave).T
        hop = settings.hop_ms / 1000
        mel_axis.imshow(mel, origin="lower", aspect="auto", cmap="magma",
                        extent=(0, mel.shape[1] * hop, 0, mel.shape[0]))  # fmt: skip
        mel_axis.set_ylabel("log-mel band")
        for word, utterance in zip(words, plan.utterances, strict=True):
            start = word.onset / settings.sample_rate
            stop = (word.onset + word.length) / settings.sample_rate
            for axis in (wave_axis, mel_axis):
                axis.axvline(start, color="tab:green", linewidth=1.2)
                axis.axvline(stop, color="tab:red", linewidth=1.2, linestyle="--")
            label = f"{settings.vocabulary[word.kind]}\n{utterance.voice}\n{utterance.rate} wpm"
            wave_axis.text((start + stop) / 2, 0.6, label, ha="center", va="bottom", fontsize=6.5)
        wave_axis.set_ylim(-0.7, 1.35)
    axes[-1].set_xlim(0, longest)
    axes[-1].set_xlabel("seconds (green: word onset, red: word end, from the clip's metadata)")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("results/spoken-words/clip.png")
    if os.environ.get("COPE_CACHE_DIR"):
        draw(target, Path(os.environ["COPE_CACHE_DIR"]))
    else:
        with tempfile.TemporaryDirectory() as temporary:
            draw(target, Path(temporary))
