"""Pure Flax model definitions: EDM UNets, preconditioning, SD's autoencoder, UNet, CLIP text
encoder and tokenizer, weight conversion, and the feature graph the networks declare
(difflax.models.graph)."""
from difflax.models.clip import CLIPTextConfig, CLIPTextTransformer, load_clip_text_encoder
from difflax.models.clip_tokenizer import CLIPTokenizer, load_clip_tokenizer
from difflax.models.convert import config_from_edm, convert_state_dict, load_edm, read_edm_snapshot
from difflax.models.dhariwal_unet import DhariwalUNet
from difflax.models.graph import FeatureGraph, FeatureNode, feature_graph, nodes_to_compute
from difflax.models.precond import PRECONDS, Denoiser, make_unet
from difflax.models.sd_unet import (SDUNet, SDUNetConfig, sd_feature_nodes, sd_run_fn,
                                    sd_skip_connections)
from difflax.models.sd_unet_weights import load_sd_unet
from difflax.models.song_unet import SongUNet
from difflax.models.vae import AutoencoderKL, VAEConfig, load_vae, save_vae
from difflax.models.unet import (MODEL_TYPES, SkipConnection, Surgery, UNetConfig, adm, ddpmpp,
                                 feature_nodes, ncsnpp, prunable_blocks, skip_connections)

__all__ = [
    "prunable_blocks",
    "MODEL_TYPES", "PRECONDS", "Denoiser", "DhariwalUNet", "FeatureGraph", "FeatureNode", "SkipConnection",
    "SongUNet", "Surgery", "UNetConfig", "adm", "config_from_edm", "convert_state_dict", "ddpmpp",
    "feature_graph", "feature_nodes", "load_edm", "make_unet", "ncsnpp", "nodes_to_compute", "read_edm_snapshot",
    "skip_connections", "AutoencoderKL", "VAEConfig", "load_vae", "save_vae",
    "SDUNet", "SDUNetConfig", "load_sd_unet", "sd_feature_nodes", "sd_run_fn", "sd_skip_connections",
    "CLIPTextConfig", "CLIPTextTransformer", "load_clip_text_encoder",
    "CLIPTokenizer", "load_clip_tokenizer",
]
