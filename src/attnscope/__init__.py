"""attnscope: see and measure the attention of any PyTorch Transformer."""

from ._version import __version__
from .adapters import register_adapter
from .analysis import alignment, rollout
from .calls import AttentionCall
from .capture import capture
from .errors import AttnScopeError
from .flow import flow
from .head_stats import head_stats
from .layers import TransformerDecoderLayerWithAttn, TransformerEncoderLayerWithAttn
from .maps import AttentionMaps, load
from .plot import plot_head, plot_heads, plot_layers
from .scan import scan  # pyarrow is imported when a table is built, not here
from .view import AttentionPage, view

__all__ = [
    "AttentionCall",
    "AttentionMaps",
    "AttentionPage",
    "AttnScopeError",
    "TransformerDecoderLayerWithAttn",
    "TransformerEncoderLayerWithAttn",
    "__version__",
    "alignment",
    "capture",
    "flow",
    "head_stats",
    "load",
    "plot_head",
    "plot_heads",
    "plot_layers",
    "register_adapter",
    "rollout",
    "scan",
    "view",
]
