"""Converters from released datasets and raw videos to lego_jax ArrayRecord records."""
