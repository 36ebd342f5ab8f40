"""attnscope: see and measure the attention of any PyTorch Transformer."""

from ._version import __version__
from .capture import capture
from .errors import AttnScopeError
from .layers import TransformerDecoderLayerWithAttn, TransformerEncoderLayerWithAttn
from .maps import AttentionMaps, load

__all__ = [
    "AttentionMaps",
    "AttnScopeError",
    "TransformerDecoderLayerWithAttn",
    "TransformerEncoderLayerWithAttn",
    "__version__",
    "capture",
    "load",
]
