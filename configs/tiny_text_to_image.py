r"""InstaFlow's whole recipe on a CPU, from a random-weight Stable Diffusion folder.

The teacher is a tiny random SD model (epsilon prediction, SD 1.5's scheduler): its
25-step DPM-Solver++ ODE with CFG makes the triplets; 2-RF starts from its UNet weights,
called at SD timestep (1 - t) * 1000; its pairs with CFG 1.5 train the one-step student.
Random weights make no pictures worth seeing: this checks the machinery and the one claim
that holds for any teacher, that reflow straightens its ODE.

    python -m rectflow_jax.random_folder --out runs/tiny_sd
    printf 'a photo of a cat\na red house by a lake\n' > runs/prompts.txt   # any caption file
    rectflow pipeline --config configs/tiny_text_to_image.py --workdir runs/tiny \
        --config.teacher.pretrained=runs/tiny_sd --config.data.prompts=runs/prompts.txt
    rectflow export --checkpoint runs/tiny/distill --out runs/tiny/instaflow_tiny
    rectflow sample --pretrained runs/tiny/instaflow_tiny --prompt "a photo of a cat" \
        --out runs/tiny/samples --config.sample.num_steps=1

Cost: about 2 minutes on 2 CPU cores. Expected, in runs/tiny/report/report.md: the
teacher's 1-step vs 25-step gap is many times 2-RF's (teacher gap / 2-RF gap about 20),
and the distilled student's one step lands close to 2-RF's 25 steps.
"""

import ml_collections

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.teacher.pretrained = None        # --config.teacher.pretrained=FOLDER
    config.teacher.method = "dpm_solver++"
    config.teacher.num_steps = 25
    config.teacher.guidance_scale = 5.0

    # 8x8x4 latents: the random folder's UNet sample_size 8 (16x16 images).
    config.data = ml_collections.ConfigDict({"name": "prompts", "latent_shape": (8, 8, 4),
                                             "prompts": ml_collections.config_dict.placeholder(str),
                                             "data_dir": ml_collections.config_dict.placeholder(str)})
    # The student and 2-RF are the teacher's UNet (and frozen text encoder) as a velocity model.
    config.model = ml_collections.ConfigDict({"name": "sd_unet", "pretrained": config.teacher.get_ref("pretrained"),
                                              "clip_skip": config.teacher.get_ref("clip_skip")})
    config.flow.cond_dropout = 0.1

    config.optim.lr = 3e-4
    config.optim.warmup_steps = 50
    config.optim.ema_decay = 0.99
    config.train.batch_size = 32
    config.train.num_steps = 400
    config.train.log_every = 50
    config.train.checkpoint_every = 400
    config.stages.distill.train = dict(num_steps=300)

    config.pairs.num_pairs = 512
    config.pairs.shard_size = 128
    config.pairs.batch_size = 128
    config.pairs.method = "euler"           # 2-RF's pairs for the student
    config.pairs.num_steps = 25
    config.pairs.guidance_scale = 1.5

    config.eval.num_samples = 32
    return config
