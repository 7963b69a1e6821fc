r"""A generative toy: N(0, I) in 2-D to two moons, through 1-RF, 2-RF and distillation.

    rectflow pipeline --config configs/toy_moons.py --workdir runs/moons
    rectflow pipeline --config configs/toy_moons.py --workdir runs/8g --config.data.name=8gaussians

Cost: about 2 minutes on 2 CPU cores. Expected: one-step 2-RF samples close to the
data where one-step 1-RF samples collapse to the mean; see the report's trajectory plots.
"""

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.data.name = "moons"
    config.model = dict(name="mlp", hidden=256, depth=3, time_embed_dim=32)

    config.optim.lr = 2e-3
    config.optim.ema_decay = 0.99
    config.train.batch_size = 512
    config.train.num_steps = 3000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000

    config.stages.reflow.train = dict(num_steps=3000)
    config.stages.distill.train = dict(num_steps=1500)
    config.stages.distill.optim = dict(lr=1e-3)

    config.pairs.num_pairs = 50000
    config.pairs.shard_size = 10000
    config.pairs.num_steps = 100
    config.pairs.batch_size = 10000

    config.sample.num_samples = 2000
    config.eval.num_samples = 2000
    return config
