r"""COCO2017-5k: FID and CLIP score of a text-to-image model, the protocol of InstaFlow's main table.

The 5,000 val2017 images, each with its first caption (lowest annotation id); one 512x512
generation per caption from the noise of (config.seed, caption index); FID at 512x512
against those 5,000 images (both sides: centre square crop, PIL bicubic resize, uint8, then
pytorch-fid's Inception with its bilinear resize to 299); CLIP score: the mean cosine
similarity of image and caption embeddings (InstaFlow's 0.304 is with ViT-g/14).

One step of a velocity folder (InstaFlow-0.9B, a distilled stage):

    rectflow eval --config configs/coco2017_5k.py --pretrained instaflow_0_9B --out runs/eval/instaflow_5k \
        --config.eval.captions=coco/annotations/captions_val2017.json --config.eval.images=coco/val2017 \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.safetensors \
        --config.eval.clip_model=CLIP-ViT-g-14-laion2B-s12B-b42K

2-RF at 25 Euler steps: add --config.sample.num_steps=25 (published: FID 21.5). Stable
Diffusion itself: --config.sample.method=dpm_solver++ --config.sample.num_steps=25
--config.sample.guidance_scale=5.0. A --checkpoint STAGE (sd_unet) works in place of
--pretrained. `python -m rectflow_jax.models.inception PTH OUT.safetensors` converts
pytorch-fid's weights once (or pass the .pth with --config.eval.allow_pickle=true).

Published (one step, InstaFlow-0.9B): FID 23.4, CLIP 0.304. Cost: 5,000 one-step images
(about 3.3 TFLOPs each) plus the measures; minutes on a GPU, the run resumes when killed.
"""

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.sample.num_steps = 1
    config.sample.method = "euler"
    config.sample.guidance_scale = 1.0   # InstaFlow samples without guidance
    config.sample.height = 512
    config.sample.width = 512
    config.sample.batch_size = 16
    config.sample.dtype = "float32"

    config.eval.protocol = "coco2017_5k"
    config.eval.num_images = 5000
    config.eval.fid_resolution = 512
    config.eval.shard_size = 500
    config.eval.batch_size = 50
    return config
