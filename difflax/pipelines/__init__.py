"""Pipelines over difflax's models and samplers: Stable Diffusion text -> image, SiT class label -> image."""
from difflax.pipelines.sit import SIT_CLASSES, SiTPipeline
from difflax.pipelines.stable_diffusion import SDScheduler, StableDiffusion, scheduler_from_diffusers

__all__ = ["SIT_CLASSES", "SDScheduler", "SiTPipeline", "StableDiffusion", "scheduler_from_diffusers"]
