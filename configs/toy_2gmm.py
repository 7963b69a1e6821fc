r"""The seeds' 2-GMM example: straighten a flow between two Gaussian mixtures.

pi0 = 1/2 N((-5,-5), 0.5^2 I) + 1/2 N((-5,5), 0.5^2 I)  (source, t = 0)
pi1 = 1/2 N((5,-5), 0.5^2 I) + 1/2 N((5,5), 0.5^2 I)    (data, t = 1)

1-RF learns crossing-free but curved paths (its straight-line interpolations cross
in the middle); reflow on its own couplings makes them straight, so one Euler step
lands on pi1.

    rectflow pipeline --config configs/toy_2gmm.py --workdir runs/toy_2gmm

Cost: about 1-2 minutes on 2 CPU cores. Expected: one-step 2-RF energy distance
about 1/10 of one-step 1-RF's or less; the 1-vs-100-step gap shrinks by >10x; the
transport cost does not grow. See runs/toy_2gmm/report/report.md.
"""

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.data.name = "2gmm"
    config.model = dict(name="mlp", hidden=128, depth=3, time_embed_dim=32)

    config.optim.lr = 3e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.99
    config.train.batch_size = 512
    config.train.num_steps = 2000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000

    config.stages.reflow.train = dict(num_steps=2000)
    config.stages.distill.train = dict(num_steps=1000)
    config.stages.distill.optim = dict(lr=1e-3)

    config.pairs.num_pairs = 20000
    config.pairs.shard_size = 5000
    config.pairs.num_steps = 100
    config.pairs.batch_size = 5000

    config.sample.num_samples = 1000
    config.eval.num_samples = 2000
    return config
