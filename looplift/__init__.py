"""looplift: write the recurrent step of a sequence model once; train it fast, search it batched.

The public API is collected here; see the README for the calling convention.
"""

from . import errors, nn, search
from .cond import Cond
from .dims import Dim, batch_dim
from .loop import Loop
from .masked import MaskedComputation
from .module import Module, Parameter
from .ops import *  # noqa: F401,F403 - the op functions are the public API
from .ops import __all__ as _ops_all
from .program import Program, Spec, compile
from .runtime.memory import reuse_freed_memory
from .runtime.named import Named
from .search import choice
from .tensor import Tensor
from .trace import is_search, is_training, mode
from .train.checkpoint import load, save

__version__ = "0.1.0"

__all__ = [
    "errors", "nn", "search", "choice", "Dim", "batch_dim", "Cond", "Loop", "MaskedComputation", "is_search",
    "is_training", "mode", "Module", "Parameter", "Program", "Spec", "compile", "Named", "Tensor", "load", "save",
    "reuse_freed_memory",
    *_ops_all,
]
