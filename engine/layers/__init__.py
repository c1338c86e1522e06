"""Building blocks of the model families: each layer loads its own tensor-parallel shard."""
