"""difflax: fast diffusion and flow sampling research in JAX/Flax.

The public API, re-exported by name: models (EDM UNets with skip scales as data),
samplers (`sample`, `reference_sample`), schedules, parameterisations, data, training and
shipped testbed models (`load_testbed`).
Metrics live in `difflax.metrics` (imported on demand: it is the heaviest module).
"""
from difflax import data, models, parameterization, schedules, training
from difflax.models import Denoiser, UNetConfig, load_edm, skip_connections
from difflax.samplers import SAMPLERS, reference_sample, sample
from difflax.testbeds import load_testbed

__all__ = ["SAMPLERS", "Denoiser", "UNetConfig", "data", "load_edm", "models",
           "load_testbed", "parameterization", "reference_sample", "sample", "schedules",
           "skip_connections", "training"]
