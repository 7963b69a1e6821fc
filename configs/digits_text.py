r"""InstaFlow's whole recipe on sklearn's digits with prompts, from a diffusion teacher to one step.

A small text-conditioned diffusion model plays Stable Diffusion: a UNet2DConditionModel
with cross-attention over a small CLIPTextModel (our Flax ports; diffusers / transformers
configs written below), trained together from scratch to predict noise on SD's
scaled-linear betas, with 10% of the prompts dropped for classifier-free guidance. The
tokenizer is a CLIP BPE learnt from the training prompts, kept in each stage (W/*/tokenizer).
Its 25-step DPM-Solver++ with CFG makes the triplets; 2-RF starts from its weights,
called at SD timestep (1 - t) * 1000, text encoder frozen; 2-RF's pairs with CFG train
the one-step student. Images are the digits at their own 8x8 (data.image_size = 16
upsamples them bilinearly; the UNet takes any multiple of 2).

    rectflow pipeline --config configs/digits_text.py --workdir runs/digits_text
    printf 'a handwritten seven\nthe digit 3\n' > prompts.txt
    rectflow sample --config configs/digits_text.py --checkpoint runs/digits_text/distill \
        --prompts-file prompts.txt --out runs/digits_text/samples --config.sample.samples_per_prompt=8
    rectflow sample --config configs/digits_text.py --checkpoint runs/digits_text/teacher \
        --prompts-file prompts.txt --out runs/digits_text/teacher_samples \
        --config.sample.method=dpm_solver++ --config.sample.num_steps=25 --config.sample.guidance_scale=2.0

Cost: about 26 minutes on 2 CPU cores. Expected, in runs/digits_text/report/report.md: the
one-step student agrees with its prompt's digit on >= 90% of training prompts and >= 85%
of held-out paraphrases, its Frechet distance is within 2x of the 25-step DPM-Solver++
teacher's, and 2-RF's one step beats the teacher's one DDIM step by far.
"""

import ml_collections

from rectflow_jax.configlib import base_config
from rectflow_jax.data import digit_prompts

TEXT_WIDTH = 32


def get_config():
    config = base_config()
    config.data = ml_collections.ConfigDict({
        "name": "digits_text", "image_size": 8,
        "templates": digit_prompts.TRAIN_TEMPLATES, "held_out_templates": digit_prompts.HELD_OUT_TEMPLATES})
    config.model = ml_collections.ConfigDict({
        "name": "sd_unet",
        # Cross-attention at 4x4 and in the middle only: on 2 CPU cores a step costs a third less.
        "unet": {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (32, 32),
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "layers_per_block": 1,
                 "attention_head_dim": 4, "norm_num_groups": 8, "cross_attention_dim": TEXT_WIDTH},
        # vocab_size bounds the corpus tokenizer's; eos_token_id 2 is CLIP's legacy "the largest id".
        "text_encoder": {"vocab_size": 1024, "hidden_size": TEXT_WIDTH, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
                         "hidden_act": "quick_gelu", "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1},
    })

    # The teacher: noise prediction on SD 1.5's betas (flow.diffusion), conditioning dropout for CFG.
    config.flow.objective = "diffusion"
    config.flow.cond_dropout = 0.1
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 200
    config.optim.ema_decay = 0.999
    config.train.batch_size = 128
    config.train.num_steps = 2000
    config.train.log_every = 100
    config.train.checkpoint_every = 500

    # Its probability-flow ODE makes the triplets, as InstaFlow's SD teacher.
    config.teacher.method = "dpm_solver++"
    config.teacher.num_steps = 25
    config.teacher.guidance_scale = 2.0

    # 2-RF from the teacher's weights (its text encoder kept), then the one-step student.
    config.stages.reflow.train = dict(num_steps=1200, freeze=("text_encoder",))
    config.stages.reflow.optim = dict(lr=3e-4, warmup_steps=100)
    config.stages.distill.train = dict(num_steps=1200, freeze=("text_encoder",))
    config.stages.distill.optim = dict(lr=3e-4, warmup_steps=100)

    config.pairs.num_pairs = 6000
    config.pairs.shard_size = 1500
    config.pairs.batch_size = 500
    config.pairs.method = "euler"           # 2-RF's pairs for the student
    config.pairs.num_steps = 10             # 2-RF is nearly straight: 10 Euler steps land where 25 do
    config.pairs.guidance_scale = 1.5

    config.sample.batch_size = 500
    config.eval.num_samples = 500           # per prompt set (training prompts, held-out paraphrases)
    config.eval.steps = (1, 2, 4, 25)
    return config
