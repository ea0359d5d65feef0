"""encoders: transformer encoders with pluggable position encodings, CoPE among them.

The public API is the names in ``__all__``; everything else may change. The library imports
nothing from ``recipes`` or ``cope_cli``. Maths: docs/cope-maths.md; the memory-linear CoPE
kernels: docs/memory-linear.md.

Names are imported on first use (PEP 562), so ``import encoders.names`` or a command line that
only lists names does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from encoders.attention import MultiHeadAttention
    from encoders.cope import CoPE, cope_attention, cope_positions, reference_cope_attention
    from encoders.frontends import (
        AudioFeatures,
        FeatureFrontend,
        TokenFrontend,
        VideoFrontend,
        from_tubelets,
        to_tubelets,
    )
    from encoders.positions import (
        PositionEncoding,
        PositionSpec,
        get_position_encoding,
        list_position_encodings,
        register_position_encoding,
    )
    from encoders.transformer import (
        Encoder,
        EncoderConfig,
        SequenceClassifier,
        TokenClassifier,
        recorded_layers,
        set_recording,
    )

# Where each public name lives.
_SOURCES: dict[str, str] = {
    "MultiHeadAttention": "encoders.attention",
    "CoPE": "encoders.cope",
    "cope_attention": "encoders.cope",
    "cope_positions": "encoders.cope",
    "reference_cope_attention": "encoders.cope",
    "AudioFeatures": "encoders.frontends",
    "FeatureFrontend": "encoders.frontends",
    "TokenFrontend": "encoders.frontends",
    "VideoFrontend": "encoders.frontends",
    "from_tubelets": "encoders.frontends",
    "to_tubelets": "encoders.frontends",
    "PositionEncoding": "encoders.positions",
    "PositionSpec": "encoders.positions",
    "get_position_encoding": "encoders.positions",
    "list_position_encodings": "encoders.positions",
    "register_position_encoding": "encoders.positions",
    "Encoder": "encoders.transformer",
    "EncoderConfig": "encoders.transformer",
    "SequenceClassifier": "encoders.transformer",
    "TokenClassifier": "encoders.transformer",
    "recorded_layers": "encoders.transformer",
    "set_recording": "encoders.transformer",
}

__all__ = [
    # CoPE (docs/cope-maths.md)
    "cope_attention",
    "cope_positions",
    "reference_cope_attention",
    "CoPE",
    # position encodings and their registry
    "PositionEncoding",
    "PositionSpec",
    "register_position_encoding",
    "get_position_encoding",
    "list_position_encodings",
    # attention, encoders and heads
    "MultiHeadAttention",
    "EncoderConfig",
    "Encoder",
    "SequenceClassifier",
    "TokenClassifier",
    "set_recording",
    "recorded_layers",
    # frontends
    "TokenFrontend",
    "FeatureFrontend",
    "AudioFeatures",
    "VideoFrontend",
    "to_tubelets",
    "from_tubelets",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    if name not in _SOURCES:
        raise AttributeError(f"module 'encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
