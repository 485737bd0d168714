"""Where the computation runs: the device mesh and shardings (``sharding``)
and JAX's persistent compilation cache (``compilation_cache``)."""
