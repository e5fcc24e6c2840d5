from lego_jax.cli import run

run()
