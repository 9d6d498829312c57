"""Built-in token-reduction methods; importing this package registers them."""

from . import tome  # noqa: F401
