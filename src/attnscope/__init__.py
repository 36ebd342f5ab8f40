"""attnscope: see and measure the attention of any PyTorch Transformer."""

from ._version import __version__
from .adapters import register_adapter
from .analysis import alignment, grad_rollout, rollout
from .calls import AttentionCall
from .capture import capture
from .errors import AttnScopeError
from .flow import flow
from .head_stats import head_stats
from .importance import head_importance
from .interventions import ablate, knockout
from .layers import TransformerDecoderLayerWithAttn, TransformerEncoderLayerWithAttn
from .maps import AttentionMaps, load
from .plot import plot_head, plot_head_importance, plot_heads, plot_layers
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
    "ablate",
    "alignment",
    "capture",
    "flow",
    "grad_rollout",
    "head_importance",
    "head_stats",
    "knockout",
    "load",
    "plot_head",
    "plot_head_importance",
    "plot_heads",
    "plot_layers",
    "register_adapter",
    "rollout",
    "scan",
    "view",
]
