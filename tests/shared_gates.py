"""What the shared gates' tests read from a classifier: the readout query's gates."""

from __future__ import annotations

import torch

from encoders.transformer import recorded_layers, set_recording


def readout_gates(model: torch.nn.Module, inputs: torch.Tensor, signal_tokens: int) -> torch.Tensor:
    """(heads, signal_tokens): the readout query's gates over the tokens after the question one,
    checked to be the same in every layer (one detector, shared)."""
    set_recording(model, True)
    with torch.no_grad():
        model(inputs)
    layers = recorded_layers(model)
    first = layers[0]["gates"]
    for layer in layers[1:]:
        torch.testing.assert_close(layer["gates"], first)
    causal = model.config.causal
    offset = 0 if causal else 1  # the CLS token comes first when bidirectional
    readout = first.shape[-1] - 1 if causal else 0
    return first[0, :, readout, offset + 1 : offset + 1 + signal_tokens]
