"""``dreamblend ui``: a local web app to tune DreamBlend by looking (G, E, alpha, each word's attention).

:mod:`.settings` holds the app's setup, one run's settings, their checks and the equivalent
``dreamblend generate`` line; :mod:`.session` loads pairs, runs blends and sweeps and stops them;
:mod:`.app` is the Gradio page over both (Gradio is imported only there).
"""
