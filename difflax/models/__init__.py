"""Pure Flax model definitions: EDM UNets, preconditioning, weight conversion."""
from difflax.models.convert import config_from_edm, convert_state_dict, load_edm, read_edm_snapshot
from difflax.models.precond import PRECONDS, Denoiser
from difflax.models.unet import (MODEL_TYPES, DhariwalUNet, SkipConnection, SongUNet, UNetConfig,
                                 UNetFeatures, adm, ddpmpp, make_unet, ncsnpp, skip_connections)

__all__ = [
    "MODEL_TYPES", "PRECONDS", "Denoiser", "DhariwalUNet", "SkipConnection", "SongUNet",
    "UNetConfig", "UNetFeatures", "adm", "config_from_edm", "convert_state_dict", "ddpmpp",
    "load_edm", "make_unet", "ncsnpp", "read_edm_snapshot", "skip_connections",
]
