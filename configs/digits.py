r"""The embedded default: scikit-learn's 1797 real 8x8 digits, 1-RF -> 2-RF -> one step.

Runs anywhere with no download. A small DDPM++-style UNet learns the flow from
N(0, I) to the digits; reflow on 1-RF's own couplings straightens it; distillation
gives a one-step generator.

    rectflow pipeline --config configs/digits.py --workdir runs/digits

Cost: about 15 minutes on 2 CPU cores (seconds on a GPU). Expected, in
runs/digits/report/report.md: the one-step distilled generator's Frechet distance
(classifier features) is within 2x of 1-RF at 100 Euler steps and under 1/5 of 1-RF
at one step; the grids show legible digits.
"""

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.model = dict(name="unet", ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0)

    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.train.batch_size = 64
    config.train.num_steps = 2000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000

    config.stages.reflow.train = dict(num_steps=1500)
    config.stages.reflow.optim = dict(lr=5e-4)
    config.stages.distill.train = dict(num_steps=1500)
    config.stages.distill.optim = dict(lr=2e-4)

    config.pairs.num_pairs = 5000
    config.pairs.shard_size = 1250
    config.pairs.num_steps = 25
    config.pairs.batch_size = 1000

    config.sample.num_samples = 100
    config.eval.num_samples = 500
    return config
