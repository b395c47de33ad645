"""The held-out evaluation's metrics, each one module registered here once, in the order
the workers run them and eval.json lists their entries (metrics.py: what a metric is).
Registering on import of the package registers them in Ray's workers too."""

from tokdist_ray.eval.bits_per_byte import BitsPerByte
from tokdist_ray.eval.compression import Compression
from tokdist_ray.eval.drift import Drift
from tokdist_ray.eval.generation import Generation
from tokdist_ray.eval.metrics import register

register(Drift())  # first: drift reads the model as loaded; bits per byte and generation write new rows into it
register(Compression())
register(BitsPerByte())
register(Generation())
