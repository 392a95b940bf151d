"""REST serving: ``create_app(checkpoint or Predictor)`` builds a FastAPI app (``finegrain serve``);
:mod:`finegrain.serve.launch` runs it as a subprocess and load-tests it."""

from finegrain.serve.app import InputError, MicroBatcher, create_app, decode_image

__all__ = ["InputError", "MicroBatcher", "create_app", "decode_image"]
