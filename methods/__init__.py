"""Built-in token-reduction methods; importing this package registers them (and declares the compositions that
the benchmarks run, see :func:`tokred.compose.declare_composition`)."""

from tokred.compose import declare_composition

from . import ca_tome, cat_pruning, deepcache, todo, tome  # noqa: F401

# A cache outside, a token method in the blocks it recomputes: one preset each, the members' main presets.
declare_composition(deepcache="interval3", tome="ratio0.5")
declare_composition(deepcache="interval3", todo="factor2")
# Listed once the diffusers-hook cache first_block_cache (kind "cache") is registered (SD3/SD3.5).
declare_composition(first_block_cache="default", todo="factor2")
