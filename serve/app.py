"""The Ray Serve application, for ``serve run`` from a checkout: it lives in the package.

    serve run serve/config.yaml        # the shipped config (a link to the package's)
    serve run serve.app:build_app bundle=runs/demo/bundle

An installed medcae needs no checkout: ``serve run medcae.serving.app:build_app bundle=B``, or
``medcae serve-config > config.yaml`` for the shipped config.
"""

from medcae.serving.app import MedcaeModel, app, build_app

__all__ = ["MedcaeModel", "app", "build_app"]
