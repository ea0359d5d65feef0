"""Measure audio-folder's OOD waveform transforms on a 1 s 440 Hz tone; prints transforms.md.

Run: PYTHONPATH=. python results/audio-ood/measure_transforms.py > results/audio-ood/transforms.md
"""

import math
import platform
import subprocess

import torch
import torchaudio

from recipes._audio import change_speed, time_stretch

RATE = 16000
TONE = 0.3 * torch.sin(2 * math.pi * 440 * torch.arange(RATE) / RATE)


def peak(wave: torch.Tensor) -> float:
    magnitude = torch.fft.rfft(wave * torch.hann_window(len(wave))).abs()
    return float(magnitude.argmax()) * RATE / len(wave)


def rms(wave: torch.Tensor) -> float:
    return float(wave.pow(2).mean().sqrt())


def uncorrected_stretch(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """time_stretch's STFT -> phase_vocoder -> iSTFT without its level correction."""
    n_fft, hop = 512, 128
    window = torch.hann_window(n_fft)
    spectrum = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, n_fft // 2 + 1)[:, None]
    stretched = torchaudio.functional.phase_vocoder(spectrum, 1 / factor, advance)
    return torch.istft(stretched, n_fft, hop, window=window, length=round(len(wave) * factor))


commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
print(f"# audio-folder OOD transforms on a 1 s 440 Hz tone ({RATE} Hz)\n")
print(f"commit {commit.stdout.strip()}, torch {torch.__version__}, torchaudio")
print(f"{torchaudio.__version__}, {platform.machine()} CPU; made by measure_transforms.py.\n")
print("| transform | duration ratio | dominant Hz | RMS (input 0.212) | RMS without correction |")
print("|---|---|---|---|---|")
for factor in (0.5, 0.8, 1.25, 2.0):
    stretched = time_stretch(TONE, factor, RATE)
    print(
        f"| stretch-x{factor:g} | {len(stretched) / len(TONE):.3f} | {peak(stretched):.1f} "
        f"| {rms(stretched):.3f} | {rms(uncorrected_stretch(TONE, factor)):.3f} |"
    )
for factor in (0.7, 1.4, 2.0):
    fast = change_speed(TONE, factor, RATE)
    print(
        f"| speed-x{factor:g} | {len(fast) / len(TONE):.3f} | {peak(fast):.1f} "
        f"| {rms(fast):.3f} | - |"
    )
