"""difflax: fast diffusion and flow sampling research in JAX/Flax.

The public API, re-exported by name: models (EDM UNets with skip scales as data),
samplers (`sample`), schedules, data, training and metrics.
"""
from difflax import data, models, schedules, training
from difflax.models import Denoiser, UNetConfig, load_edm, skip_connections
from difflax.samplers import SAMPLERS, sample

__all__ = ["SAMPLERS", "Denoiser", "UNetConfig", "data", "load_edm", "models", "sample",
           "schedules", "skip_connections", "training"]
