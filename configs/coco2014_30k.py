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

from pathlib import Path

from rectflow_jax.configlib import load_config


def get_config():
    # The generations of configs/coco2017_5k.py; only the captions drawn and the FID resolution differ.
    config = load_config(Path(__file__).with_name("coco2017_5k.py"))
    config.eval.protocol = "coco2014_30k"
    config.eval.num_images = 30_000
    config.eval.fid_resolution = 256
    return config
