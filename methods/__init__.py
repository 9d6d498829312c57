"""Built-in token-reduction methods; importing this package registers them."""

from . import ca_tome, cat_pruning, deepcache, diffusers_caches, evit, mctf, pitome, todo, tofu, tome  # noqa: F401
