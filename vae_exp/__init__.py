"""vae_exp: Hydra-configured variational autoencoder experiments.

Modules by floor (each imports only from its floor or below; README "Layout" says more):
7 __main__, compare; 6 train; 5 evaluate; 4 build; 3 losses, steps, checkpoint, outputs,
tracking; 2 models, likelihood, data, distributed, preemption, schedules; 1 config.
"""

__version__ = "0.1.0"
