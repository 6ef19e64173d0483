"""atm_jax: ATM (Alternating Tuning and Merging, arXiv 2411.03055) in JAX/Flax."""
