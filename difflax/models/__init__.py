"""Pure Flax model definitions: EDM UNets, preconditioning, SD's autoencoder, weight conversion,
and the feature graph the networks declare (difflax.models.graph)."""
from difflax.models.condconv import CondConv2d, clme_experts
from difflax.models.convert import config_from_edm, convert_state_dict, load_edm, read_edm_snapshot
from difflax.models.gri_attention import GRIConfig, gri_attention
from difflax.models.dhariwal_unet import DhariwalUNet
from difflax.models.graph import FeatureGraph, FeatureNode, feature_graph, nodes_to_compute
from difflax.models.precond import PRECONDS, Denoiser, make_unet
from difflax.models.song_unet import SongUNet
from difflax.models.vae import AutoencoderKL, VAEConfig, load_vae
from difflax.models.unet import (MODEL_TYPES, SkipConnection, Surgery, UNetConfig, adm, ddpmpp,
                                 feature_nodes, ncsnpp, prunable_blocks, skip_connections)

__all__ = [
    "CondConv2d", "GRIConfig", "clme_experts", "gri_attention", "prunable_blocks",
    "MODEL_TYPES", "PRECONDS", "Denoiser", "DhariwalUNet", "FeatureGraph", "FeatureNode", "SkipConnection",
    "SongUNet", "Surgery", "UNetConfig", "adm", "config_from_edm", "convert_state_dict", "ddpmpp",
    "feature_graph", "feature_nodes", "load_edm", "make_unet", "ncsnpp", "nodes_to_compute", "read_edm_snapshot",
    "skip_connections", "AutoencoderKL", "VAEConfig", "load_vae",
]
