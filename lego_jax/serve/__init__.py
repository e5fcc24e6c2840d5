"""`lego-jax serve`: a local web page over a workdir's trained models (engine.py: the models and
the single-frame path; app.py: the HTTP side, the queue and the command; page.html: the page)."""
