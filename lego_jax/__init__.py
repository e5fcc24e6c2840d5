"""lego_jax: LEGO (egocentric action frame generation via visual instruction tuning) in JAX."""

import flax

# Parameters carry logical axis names; they are placed on the mesh explicitly by the trainers
# (lego_jax.parallel.sharding) rather than eagerly at creation, so models build without a mesh.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
