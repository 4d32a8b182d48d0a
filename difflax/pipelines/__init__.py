"""Pipelines over difflax's models and samplers: Stable Diffusion text -> image."""
from difflax.pipelines.stable_diffusion import SDScheduler, StableDiffusion, scheduler_from_diffusers

__all__ = ["SDScheduler", "StableDiffusion", "scheduler_from_diffusers"]
