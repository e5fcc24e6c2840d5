"""Files shipped inside the package (lego_jax/assets/shipped.py)."""
