"""``llamita serve``: an OpenAI-compatible HTTP server over one model, with continuous batching.

``app.py`` holds the app and its error handling, ``routes.py`` the routes and OpenAI's shapes,
``engine.py`` the thread that batches requests.
"""
