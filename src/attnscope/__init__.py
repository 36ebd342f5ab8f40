"""attnscope: see and measure the attention of any PyTorch Transformer."""

from ._version import __version__
from .capture import capture
from .errors import AttnScopeError
from .layers import TransformerDecoderLayerWithAttn, TransformerEncoderLayerWithAttn
from .maps import AttentionMaps, load
from .plot import plot_head, plot_heads, plot_layers
from .view import AttentionPage, view

__all__ = [
    "AttentionMaps",
    "AttentionPage",
    "AttnScopeError",
    "TransformerDecoderLayerWithAttn",
    "TransformerEncoderLayerWithAttn",
    "__version__",
    "capture",
    "load",
    "plot_head",
    "plot_heads",
    "plot_layers",
    "view",
]
