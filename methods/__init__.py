"""Built-in token-reduction methods; importing this package registers them (and declares the compositions that
the benchmarks run, see :func:`tokred.compose.declare_composition`)."""

from tokred.compose import declare_composition

from . import ca_tome, cat_pruning, deepcache, diffusers_caches, evit, mctf, pitome, todo, tofu, tome, zero_tprune  # noqa: F401

# A cache outside, a token method in the blocks it recomputes: one preset each, the members' main presets.
declare_composition(deepcache="interval3", tome="ratio0.5")
declare_composition(deepcache="interval3", todo="factor2")
declare_composition(first_block_cache="threshold0.05", todo="factor2")  # SD3/SD3.5, PixArt, DiT, Flux
