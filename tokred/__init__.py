"""tokred: token-reduction methods for transformers behind one interface.

>>> import timm, tokred
>>> model = timm.create_model("deit_small_patch16_224")
>>> patch = tokred.apply(model, "tome", r=13)      # patched in place
>>> patch.remove()                                 # bit-exact original again
"""

from .api import apply, get_patch, remove
from .errors import InvalidOptionError, TokredError, UnknownMethodError, UnknownTaskError, UnsupportedModelError
from .method import Method
from .patch import Patch
from .registry import get_method, list_methods, register_method

__version__ = "0.1.0"

__all__ = [
    "InvalidOptionError",
    "Method",
    "Patch",
    "TokredError",
    "UnknownMethodError",
    "UnknownTaskError",
    "UnsupportedModelError",
    "apply",
    "get_method",
    "get_patch",
    "list_methods",
    "register_method",
    "remove",
]
