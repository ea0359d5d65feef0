"""encoders: transformer encoders with pluggable position encodings, CoPE among them.

The public API is the names in ``__all__``; everything else may change. The library imports
nothing from ``recipes`` or ``cope_cli``. Maths: docs/cope-maths.md; the memory-linear CoPE
kernels: docs/memory-linear.md.
"""

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
