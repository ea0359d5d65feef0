"""CoPE gate variants (qk, onset, token) against their formulas, written as a plain loop."""

from __future__ import annotations

import math

import pytest
import torch
from test_cope_reference import loop_cope

from encoders.cope import (
    cope_attention,
    cope_gates,
    cope_positions,
    onset_keys,
    reference_cope_attention,
)
from encoders.transformer import EncoderConfig, SequenceClassifier, recorded_layers, set_recording


def loop_gate(gate, q, k, gate_logits, b, h, i, j):
    """One gate g_ij of a variant, from its documented formula (encoders/cope.py docstring)."""
    head_dim = q.shape[-1]
    if gate == "qk":
        return torch.sigmoid(q[b, h, i] @ k[b, h, j] / math.sqrt(head_dim))
    if gate == "onset":
        previous = k[b, h, j - 1] if j > 0 else k[b, h, 0]  # k_{-1} := k_0
        change = q[b, h, i] @ (k[b, h, j] - previous) / math.sqrt(head_dim)
        return (2 * torch.sigmoid(change) - 1).abs()
    return torch.sigmoid(gate_logits[b, h, j])


def loop_cope_gated(q, k, v, table, gate, gate_logits=None, *, causal, key_padding_mask=None):
    """CoPE term by term (tests/test_cope_reference.py's loop) with the chosen gate variant."""

    def gate_of(b, h, i, j):
        return loop_gate(gate, q, k, gate_logits, b, h, i, j)

    return loop_cope(
        q, k, v, table, causal=causal, key_padding_mask=key_padding_mask, gate_of=gate_of
    )


def _draw(*shape, generator, std=1.0):
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).requires_grad_()


@pytest.mark.parametrize("gate", ["qk", "onset", "token"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_each_gate_variant_equals_its_formula_in_values_and_gradients(gate, causal):
    batch, heads, length, head_dim, npos = 2, 2, 6, 4, 3
    rows = npos if causal else 2 * npos - 1
    generator = torch.Generator().manual_seed(11)
    q, k, v = (_draw(batch, heads, length, head_dim, generator=generator, std=1.5) for _ in "qkv")
    table = _draw(rows, head_dim, generator=generator, std=0.7)
    logits = _draw(batch, heads, length, generator=generator, std=2.0)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, 4:] = True  # second sequence: 4 real tokens of 6
    extra = {
        "gate_keys": onset_keys(k) if gate == "onset" else None,
        "gate_logits": logits if gate == "token" else None,
    }
    expected = loop_cope_gated(q, k, v, table, gate, logits, causal=causal, key_padding_mask=mask)
    actual = cope_attention(
        q, k, v, table, causal=causal, key_padding_mask=mask, impl="auto", gate=gate, **extra
    )
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    upstream = torch.randn_like(expected)
    inputs = (q, k, v, table, logits)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs, allow_unused=True)
    actual_grads = torch.autograd.grad((actual * upstream).sum(), inputs, allow_unused=True)
    for name, got, want in zip(
        ("q", "k", "v", "e", "logits"), actual_grads, expected_grads, strict=True
    ):
        if want is None:
            assert got is None or not got.abs().any(), f"{name} should not get a gradient"
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")
    if gate == "token":
        assert actual_grads[4].abs().sum() > 0, "the token gate's logits must be learnable"


def test_qk_gate_with_defaults_is_the_papers_reference_unchanged():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (_draw(1, 2, 5, 4, generator=generator) for _ in "qkv")
    table = _draw(6, 4, generator=generator)
    torch.testing.assert_close(
        reference_cope_attention(q, k, v, table, gate="qk"),
        reference_cope_attention(q, k, v, table),
        rtol=0,
        atol=0,
    )


def test_onset_gates_are_zero_for_a_constant_input_and_open_at_a_step():
    length, head_dim = 10, 4
    step_at = 6
    key = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    q = torch.tensor([2.0, -4.0, 1.0, 6.0], dtype=torch.float64).expand(1, 1, length, head_dim)
    constant = key.expand(1, 1, length, head_dim)
    gates = cope_gates(q, constant, causal=False, gate="onset", gate_keys=onset_keys(constant))
    assert gates.abs().max().item() == 0.0

    stepped = constant.clone()
    stepped[..., step_at:, :] = 0.0  # the sound stops at step_at and stays off
    gates = cope_gates(q, stepped, causal=False, gate="onset", gate_keys=onset_keys(stepped))[0, 0]
    assert (gates[:, step_at] > 0.99).all(), "the gate must open where the input changes"
    others = [j for j in range(length) if j != step_at]
    assert gates[:, others].abs().max().item() == 0.0
    positions = cope_positions(
        q, stepped, causal=False, gate="onset", gate_keys=onset_keys(stepped)
    )[0, 0]
    # a query left of the step sees every key beyond it one event away, and nothing before it
    assert positions[0, step_at:].tolist() == pytest.approx([-1.0] * (length - step_at), abs=0.01)
    assert positions[0, :step_at].abs().max().item() == 0.0


def test_onset_gates_are_masked_like_qk_gates():
    generator = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 1, 6, 4, generator=generator) for _ in "qk")
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 3:] = True
    gates = cope_gates(
        q, k, causal=True, key_padding_mask=mask, gate="onset", gate_keys=onset_keys(k)
    )
    assert gates[0, :, :, 3:].abs().max().item() == 0.0  # padded keys
    assert torch.triu(gates[1, 0], diagonal=1).abs().max().item() == 0.0  # future keys


def test_token_gates_ignore_the_query():
    generator = torch.Generator().manual_seed(9)
    q, k = (torch.randn(1, 2, 5, 4, generator=generator) for _ in "qk")
    logits = torch.randn(1, 2, 5, generator=generator)
    gates = cope_gates(q, k, causal=False, gate="token", gate_logits=logits)
    torch.testing.assert_close(gates, torch.sigmoid(logits)[:, :, None, :].expand(1, 2, 5, 5))


@pytest.mark.parametrize(
    ("gate", "extra", "message"),
    [
        ("onset", {}, "gate_keys"),
        ("token", {}, "gate_logits"),
        ("qk", {"gate_logits": torch.zeros(1, 1, 3)}, r"only used by the per-key gates \(token"),
        ("frames", {}, "unknown CoPE gate"),
    ],
)
def test_gate_inputs_that_do_not_fit_the_variant_are_refused(gate, extra, message):
    q = torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match=message):
        cope_attention(q, q, q, torch.zeros(3, 2), gate=gate, **extra)


@pytest.mark.parametrize("gate", ["qk", "onset", "token"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_a_classifier_with_each_gate_trains_and_records_its_gates(gate, causal):
    from encoders.frontends import FeatureFrontend

    config = EncoderConfig(dim=16, depth=1, heads=2, mlp_dim=32, causal=causal, cope_gate=gate)
    model = SequenceClassifier(FeatureFrontend(5, 16), config, num_classes=3)
    inputs = torch.randn(2, 7, 5)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    with torch.no_grad():  # the zero-initialised table gives the gates no gradient yet
        model.encoder.blocks[0].attention.positions.cope.pos_emb.normal_()
    model(inputs, mask).sum().backward()
    head = model.encoder.blocks[0].attention.positions.gate_head
    assert (head is not None) == (gate == "token")
    if head is not None:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    set_recording(model, True)
    model(inputs, mask)
    layer = model.encoder.blocks[0].attention.positions
    assert layer.last_gates is not None and layer.last_gates.shape == (2, 2, 8, 8)
    assert recorded_layers(model)[0]["positions"] is not None


def test_unknown_gate_in_the_encoder_config_lists_the_valid_ones():
    with pytest.raises(ValueError, match="qk, onset, token"):
        EncoderConfig(cope_gate="frames")


# --- the option through the CLI, compare, sweep and report -------------------------------------


def test_cope_gate_option_reaches_the_runs_config_and_model(tmp_path):
    import engine_helpers  # noqa: F401  (registers the tiny recipes)
    from typer.testing import CliRunner

    from cope_cli.app import app
    from recipes.engine import rundir
    from recipes.engine.runs import load_run

    args = ["train", "tiny-majority-tf", "--pe", "cope", "--cope-gate", "token", "--steps", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (run_dir,) = rundir.find_runs(tmp_path, "tiny-majority-tf", "cope")
    assert rundir.read_config(run_dir)[1]["model.cope_gate"] == "token"
    model = load_run(run_dir).model
    assert model.encoder.blocks[0].attention.positions.gate_head is not None


def test_an_unknown_cope_gate_is_a_one_line_user_error():
    import engine_helpers  # noqa: F401
    from typer.testing import CliRunner

    from cope_cli.app import app

    result = CliRunner().invoke(app, ["config", "tiny-majority-tf", "--cope-gate", "frames"])
    assert result.exit_code == 2 and "qk, onset, token" in result.output
    assert "Traceback" not in result.output


def test_compare_gives_the_gate_to_cope_runs_only(tmp_path, monkeypatch):
    import engine_helpers  # noqa: F401

    from recipes.engine import compare as compare_module

    captured = []
    monkeypatch.setattr(compare_module, "run_grid", lambda jobs, **kwargs: captured.extend(jobs))
    compare_module.compare(
        "tiny-majority-tf", ["cope", "abs"], [0], cli_options={"model.cope_gate": "onset"}
    )
    gates = {job.config["model.pe"]: job.config["model.cope_gate"] for job in captured}
    assert gates == {"cope": "onset", "abs": "qk"}


def test_gates_sweep_runs_each_gate_once_and_each_baseline_once_per_direction():
    from pathlib import Path

    import recipes.catalog  # noqa: F401  (registers audio-events and moving-shapes)
    from recipes.engine.compare import load_sweep

    jobs, settings = load_sweep(Path(__file__).parent.parent / "sweeps" / "gates.toml")
    cells = {
        (
            job.recipe,
            job.config["model.causal"],
            job.config["model.pe"],
            job.config["model.cope_gate"],
            job.config["train.seed"],
        )
        for job in jobs
    }
    assert len(cells) == len(jobs) == 2 * 2 * 7 * 3  # no run twice
    for recipe in ("audio-events", "moving-shapes"):
        for causal in (False, True):
            for gate in ("qk", "onset", "token"):
                assert (recipe, causal, "cope", gate, 2) in cells
            for pe in ("abs", "rope", "rel", "nope"):
                assert (recipe, causal, pe, "qk", 0) in cells
    assert settings["pes"] == ["cope", "abs", "rope", "rel", "nope"]


def test_report_labels_a_cope_gate_variant_as_its_own_encoding():
    from pathlib import Path

    from recipes.engine.report import RunRecord, group_runs

    def record(pe, gate):
        config = {"model.pe": pe, "model.cope_gate": gate, "train.seed": 0, "model.dim": 8}
        return RunRecord(Path(f"/runs/{pe}-{gate}"), "r", config, {"splits": {}})

    records = [record("cope", "qk"), record("cope", "onset"), record("abs", "qk")]
    (group,) = group_runs(records)
    assert [member.pe for member in group.records] == ["cope", "cope[onset]", "abs"]


def test_a_run_saved_before_cope_gate_existed_is_reused_as_a_qk_run(tmp_path):
    import json

    import engine_helpers  # noqa: F401
    from typer.testing import CliRunner

    from cope_cli.app import app
    from recipes.engine import rundir

    args = ["train", "tiny-majority-tf", "--pe", "cope", "--steps", "2", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, args).exit_code == 0
    (run_dir,) = rundir.find_runs(tmp_path, "tiny-majority-tf", "cope")
    saved = json.loads((run_dir / rundir.CONFIG_FILE).read_text())
    del saved["config"]["model.cope_gate"]  # as written before the option existed
    (run_dir / rundir.CONFIG_FILE).write_text(json.dumps(saved))
    assert rundir.read_config(run_dir)[1]["model.cope_gate"] == "qk"
    result = CliRunner().invoke(app, [*args, "--cope-gate", "qk"])
    # found identical: `cope train` refuses to repeat it (compare and sweep would reuse it)
    assert result.exit_code == 2 and "with this configuration exists" in result.output


# --- change cues in the frontends' inputs (data.deltas, data.frame_diff) -----------------------


def test_audio_events_deltas_append_first_and_second_differences(tmp_path):
    import torchaudio

    from recipes.audio_events import AudioEvents
    from recipes.base import pad_collate

    config = {**AudioEvents.defaults, "data.train_size": 8, "data.eval_size": 4}
    recipe = AudioEvents()
    plain = recipe.build_data(config, tmp_path, download=False)
    with_deltas = recipe.build_data({**config, "data.deltas": True}, tmp_path, download=False)
    mels = plain.info["feature_dim"]
    assert with_deltas.info["feature_dim"] == 3 * mels
    item, delta_item = plain.train[0], with_deltas.train[0]
    static = item["inputs"][:, :mels]
    first = torchaudio.functional.compute_deltas(static.T).T
    torch.testing.assert_close(delta_item["inputs"][:, :mels], static)
    torch.testing.assert_close(delta_item["inputs"][:, mels : 2 * mels], first)
    torch.testing.assert_close(delta_item["inputs"][:, 3 * mels :], item["inputs"][:, mels:])
    model = recipe.build_model({**config, "data.deltas": True}, with_deltas.info)
    batch = pad_collate([with_deltas.train[0], with_deltas.train[1]])
    assert model(batch["inputs"], batch["padding_mask"]).shape[0] == 2


def test_moving_shapes_frame_diff_adds_a_channel_of_frame_differences():
    from recipes.base import pad_collate
    from recipes.moving_shapes import MovingShapes

    config = {**MovingShapes.defaults, "data.train_size": 4, "data.eval_size": 4}
    recipe = MovingShapes()
    plain = recipe.build_data(config, None, False)
    with_diff = recipe.build_data({**config, "data.frame_diff": True}, None, False)
    assert with_diff.info["channels"] == 2
    frames = plain.train[0]["inputs"][:, 0]
    inputs = with_diff.train[0]["inputs"]
    torch.testing.assert_close(inputs[:, 0], frames)
    torch.testing.assert_close(inputs[1:, 1], frames[1:] - frames[:-1])
    assert inputs[0, 1].abs().max() == 0
    model = recipe.build_model({**config, "data.frame_diff": True}, with_diff.info)
    batch = pad_collate([with_diff.train[0], with_diff.train[1]])
    assert model(batch["inputs"], batch["padding_mask"]).shape[0] == 2
