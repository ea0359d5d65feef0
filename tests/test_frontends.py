"""Frontends: the shapes they document, from real audio files and generated clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from encoders.frontends import (
    AudioFeatures,
    FeatureFrontend,
    TokenFrontend,
    VideoFrontend,
    from_tubelets,
    subsample_mask,
    to_tubelets,
)


def write_tone(path, seconds: float, frequency: float, sample_rate: int = 16000) -> None:
    """A WAV file of a sine tone with a little noise, 16-bit PCM."""
    time = np.arange(int(seconds * sample_rate)) / sample_rate
    noise = np.random.default_rng(0).normal(0, 0.01, time.shape)
    signal = 0.5 * np.sin(2 * math.pi * frequency * time) + noise
    soundfile.write(path, signal.astype(np.float32), sample_rate, subtype="PCM_16")


def read_wav(path) -> torch.Tensor:
    samples, _ = soundfile.read(path, dtype="float32")
    return torch.from_numpy(samples)


def test_log_mel_features_of_a_decoded_wav_have_the_documented_shape(tmp_path):
    write_tone(tmp_path / "tone.wav", 1.0, 1000.0)
    waveform = read_wav(tmp_path / "tone.wav")
    assert waveform.shape == (16000,)
    features = AudioFeatures(kind="logmel", n_features=40)
    out = features(waveform)
    assert out.shape == (101, 40) == (features.num_frames(16000), features.output_dim)
    assert torch.isfinite(out).all()
    batched = features(torch.stack((waveform, waveform * 0.1)))
    assert batched.shape == (2, 101, 40)
    # Log energy: a signal ten times quieter is log(100) lower in every mel band.
    difference = (batched[0] - batched[1])[:, 5:35].mean()
    assert difference.item() == pytest.approx(math.log(100), rel=0.05)


def test_log_mel_energy_peaks_in_the_band_of_the_tone(tmp_path):
    features = AudioFeatures(kind="logmel", n_features=40)
    peaks = []
    for frequency in (500.0, 3000.0):
        write_tone(tmp_path / f"{frequency}.wav", 0.5, frequency)
        peaks.append(features(read_wav(tmp_path / f"{frequency}.wav")).mean(0).argmax().item())
    assert peaks[0] < peaks[1]


def test_mfcc_with_deltas_triples_the_feature_width(tmp_path):
    write_tone(tmp_path / "tone.wav", 0.75, 440.0, sample_rate=8000)
    waveform = read_wav(tmp_path / "tone.wav")
    features = AudioFeatures(sample_rate=8000, kind="mfcc", n_features=13, deltas=True)
    out = features(waveform)
    assert out.shape == (6000 // 80 + 1, 39)
    assert features.win_length == 200 and features.hop_length == 80  # 25 ms, 10 ms at 8 kHz
    # Deltas of a steady tone are near zero away from the edges; the statics are not.
    middle = out[10:-10]
    assert middle[:, 13:].abs().mean() < 0.1 * middle[:, :13].abs().mean()


def test_unknown_audio_feature_kind_is_rejected():
    with pytest.raises(ValueError, match="logmel"):
        AudioFeatures(kind="spectrogram")


def test_feature_frontend_feeds_decoded_audio_features_to_tokens(tmp_path):
    write_tone(tmp_path / "tone.wav", 0.5, 800.0)
    features = AudioFeatures(kind="logmel", n_features=40)(read_wav(tmp_path / "tone.wav"))
    batch = torch.stack((features, features))  # (2, 51, 40)
    mask = torch.zeros(2, 51, dtype=torch.bool)
    mask[1, 30:] = True
    out = FeatureFrontend(40, 32, stack=2)(batch, mask)
    assert out.tokens.shape == (2, 26, 32)
    assert out.padding_mask.shape == (2, 26) and out.coords is None
    assert out.padding_mask[1].tolist() == [False] * 15 + [True] * 11


def test_feature_frontend_stacks_consecutive_frames_in_order():
    frontend = FeatureFrontend(feature_dim=1, dim=3, stack=3)
    with torch.no_grad():
        frontend.projection.weight.copy_(torch.eye(3))
        frontend.projection.bias.zero_()
    frames = torch.arange(1.0, 8.0).reshape(1, 7, 1)
    tokens = frontend(frames).tokens
    assert tokens[0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]  # the tail is zero-padded


def test_a_stacked_frame_is_padding_only_when_all_its_frames_are():
    mask = torch.tensor([[False, False, False, True, True, True, True]])
    assert subsample_mask(mask, 2).tolist() == [[False, False, True, True]]
    assert subsample_mask(mask, 1) is mask


def test_token_frontend_embeds_ids_and_keeps_the_mask():
    mask = torch.tensor([[False, False, True]])
    out = TokenFrontend(vocab_size=7, dim=8)(torch.tensor([[1, 6, 0]]), mask)
    assert out.tokens.shape == (1, 3, 8) and out.padding_mask is mask and out.coords is None


def test_tubelet_rearrangement_round_trips():
    clips = torch.randn(2, 6, 3, 16, 24)
    tubelets = to_tubelets(clips, (2, 8, 8))
    assert tubelets.shape == (2, 3, 2 * 3, 2 * 8 * 8 * 3)
    torch.testing.assert_close(from_tubelets(tubelets, (2, 8, 8), (2, 3), channels=3), clips)
    # The first tubelet holds frames 0-1 of the top-left 8x8 patch.
    first = tubelets[0, 0, 0].reshape(2, 8, 8, 3)
    torch.testing.assert_close(first, clips[0, :2, :, :8, :8].permute(0, 2, 3, 1))


def test_mlp_max_video_frontend_gives_one_token_per_tubelet_step():
    frontend = VideoFrontend(channels=1, dim=32, tubelet=(2, 8, 8), tokenizer="mlp-max")
    clips = torch.randn(2, 9, 1, 32, 32)  # 9 frames: the last tubelet step is zero-padded
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 4:] = True
    out = frontend(clips, mask)
    assert out.tokens.shape == (2, 5, 32) and out.coords is None
    assert out.padding_mask[1].tolist() == [False, False, True, True, True]


def test_mlp_max_token_ignores_where_in_the_frame_a_patch_is():
    frontend = VideoFrontend(channels=1, dim=16, tubelet=(2, 8, 8), tokenizer="mlp-max")
    clips = torch.randn(1, 2, 1, 16, 16)
    swapped = clips.clone()  # swap the top-left and bottom-right patches
    swapped[..., :8, :8], swapped[..., 8:, 8:] = clips[..., 8:, 8:], clips[..., :8, :8]
    torch.testing.assert_close(frontend(swapped).tokens, frontend(clips).tokens)


@pytest.mark.parametrize("tokenizer", ["patches", "linear"])
def test_patch_video_frontends_give_one_token_per_tubelet_with_coords(tokenizer):
    frontend = VideoFrontend(channels=3, dim=24, tubelet=(2, 4, 4), tokenizer=tokenizer)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 4:] = True
    out = frontend(torch.randn(1, 6, 3, 8, 12), mask)
    steps, grid = 3, (2, 3)
    assert out.tokens.shape == (1, steps * 6, 24)
    assert out.coords.shape == (steps * 6, 3)
    assert out.coords[7].tolist() == [1, 0, 1]  # step 1, row 0, column 1
    assert out.coords.max(0).values.tolist() == [steps - 1, grid[0] - 1, grid[1] - 1]
    assert out.padding_mask[0].tolist() == [False] * 12 + [True] * 6


def test_video_frames_must_tile_into_patches():
    with pytest.raises(ValueError, match="divisible"):
        VideoFrontend(channels=1, dim=8, tubelet=(2, 8, 8))(torch.randn(1, 4, 1, 12, 16))
    with pytest.raises(ValueError, match="tokenizer"):
        VideoFrontend(channels=1, dim=8, tokenizer="conv")


def test_video_frontend_tokens_a_clip_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for index in range(6):
            image = np.zeros((32, 32, 3), dtype=np.uint8)
            image[:, index * 4 : index * 4 + 8] = 255  # a bar moving right
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    clip = torch.from_numpy(np.stack(frames)).float().div(255)[None, :, None]  # (1, T, 1, H, W)
    assert clip.shape == (1, 6, 1, 32, 32)
    out = VideoFrontend(channels=1, dim=16, tubelet=(2, 8, 8), tokenizer="patches")(clip)
    assert out.tokens.shape == (1, 3 * 16, 16) and out.coords.shape == (48, 3)
