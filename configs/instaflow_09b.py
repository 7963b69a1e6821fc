r"""InstaFlow-0.9B: one-step distillation of a 2-Rectified Flow folder (the released 2-RF from SD 1.5).

The teacher folder is a velocity model (RectifiedFlowPipeline), straight already, so the
pipeline makes its pairs (25 Euler steps, CFG 1.5 as in the released model card) and
distils them into a one-step student initialised from it and called at t = 0 (SD timestep
1000): L2 on latents for 21.5k steps, then LPIPS (VGG) on the VAE-decoded images for 18k,
batch 1024.

    rectflow pipeline --config configs/instaflow_09b.py --workdir runs/instaflow \
        --config.teacher.pretrained=2_rectified_flow_from_sd_1_5 --config.data.prompts=laion_prompts.parquet \
        --config.flow.lpips.backbone=vgg16-397923af.pth --config.flow.lpips.allow_pickle=True
    rectflow export --checkpoint runs/instaflow/distill --out runs/instaflow/instaflow_0_9B
    rectflow sample --pretrained runs/instaflow/instaflow_0_9B --prompt "a photograph of a snowy mountain" \
        --out runs/instaflow/samples --config.sample.num_steps=1

Cost: the paper's distillation took most of InstaFlow's 199 A100-days. Published result at
one step: COCO2017-5k FID 23.4 and CLIP 0.304, COCO2014-30k FID 13.1; 0.09 s per image on
an A100 (batch 1, with text encoding and VAE decoding).
"""

import ml_collections

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.teacher.pretrained = None        # --config.teacher.pretrained=2_rectified_flow_from_sd_1_5
    config.teacher.method = "euler"
    config.teacher.num_steps = 25
    config.teacher.guidance_scale = 1.5
    config.teacher.dtype = "bfloat16"

    config.data = ml_collections.ConfigDict({"name": "prompts", "latent_shape": (64, 64, 4),
                                             "prompts": ml_collections.config_dict.placeholder(str),
                                             "data_dir": ml_collections.config_dict.placeholder(str)})
    config.model = ml_collections.ConfigDict({"name": "sd_unet", "pretrained": config.teacher.get_ref("pretrained"),
                                              "clip_skip": config.teacher.get_ref("clip_skip"),
                                              "dtype": "bfloat16", "param_dtype": "float32", "remat": True})

    config.optim.lr = 1e-6
    config.optim.warmup_steps = 1000
    config.optim.grad_clip = 1.0
    config.optim.ema_decay = 0.9999
    config.train.batch_size = 1024
    config.train.num_steps = 39_500
    config.train.log_every = 100
    config.train.checkpoint_every = 2500
    config.flow.loss = "l2"
    config.flow.loss_switch = ml_collections.ConfigDict({"loss": "lpips", "step": 21_500})

    config.pairs.num_pairs = 1_600_000
    config.pairs.shard_size = 10_000
    config.pairs.batch_size = 64
    config.eval.num_samples = 64
    return config
