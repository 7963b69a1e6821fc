r"""COCO2014-30k: FID of a text-to-image model on 30,000 val2014 captions at 256x256.

30,000 of the 40,504 val2014 images, drawn once by numpy's default_rng(eval.caption_seed)
and kept in id order, each with its first caption; one 512x512 generation per caption;
FID at 256x256 against those 30,000 images (both sides: centre square crop, PIL bicubic
resize to 256, uint8, then pytorch-fid's Inception, bilinear to 299); CLIP score as in
configs/coco2017_5k.py.

    rectflow eval --config configs/coco2014_30k.py --pretrained instaflow_0_9B --out runs/eval/instaflow_30k \
        --config.eval.captions=coco/annotations/captions_val2014.json --config.eval.images=coco/val2014 \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.safetensors \
        --config.eval.clip_model=CLIP-ViT-g-14-laion2B-s12B-b42K

Published (one step, InstaFlow-0.9B): FID 13.1. Cost: 30,000 images; the shards (500
images each, stored at 256x256) let a killed run continue where it stopped.
"""

from rectflow_jax.configlib import base_config


def get_config():
    config = base_config()
    config.sample.num_steps = 1
    config.sample.method = "euler"
    config.sample.guidance_scale = 1.0
    config.sample.height = 512
    config.sample.width = 512
    config.sample.batch_size = 16
    config.sample.dtype = "float32"

    config.eval.protocol = "coco2014_30k"
    config.eval.num_images = 30_000
    config.eval.fid_resolution = 256
    config.eval.shard_size = 500
    config.eval.batch_size = 50
    return config
