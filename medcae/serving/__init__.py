"""Serving over HTTP: request limits and decoding, auth, middleware, the page, the client, the
single-process baseline (Ray-free), and the Ray Serve app (:mod:`medcae.serving.app`)."""
