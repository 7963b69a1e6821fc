"""Speed of our Flax SD models against diffusers/transformers PyTorch: same weights, same inputs.

    python benchmarks/sd_speed.py --size sd15 --batch 1 --dtype float32 --repeats 3
    python benchmarks/sd_speed.py --size tiny --repeats 5                 # a smoke run in seconds
    python benchmarks/sd_speed.py --size sd15 --throughput_batch 4        # adds images/s at batch 4
    python benchmarks/sd_speed.py --size sd15 --parts lora,controlnet     # what LoRA and ControlNet add

Random weights at SD 1.5 sizes (UNet 320/640/1280/1280, VAE 128/256/512/512, CLIP 768 x 12
layers) are built in torch, written to a temporary diffusers folder and loaded into ours,
so both sides compute the same function. Rows: the UNet forward (64x64 latents, 77
tokens), the VAE decoder (64 -> 512), and the one-step pipeline from token ids (text
encoder + UNet + Euler step + VAE decode + uint8 images); `lora`: that pipeline with a
merged rank-4 LoRA on every attention projection; `controlnet`: with a ControlNet (diffusers'
from_unet of the same UNet) steering the UNet, against torch's ControlNetModel + UNet with
residuals. Their `vs_plain` is the time over the plain one-step image's, raced together. Warm-up (JAX compilation, torch's
first call) is excluded; JAX results are waited for with block_until_ready; torch runs
under inference_mode. Each row is the fastest of --repeats calls, ours and torch's
alternating. On CPU both use every core: the 1-minute load average is printed with each
row; other work on the machine slows both sides, torch's OpenMP threads usually more.

Costs (XLA cost analysis): UNet 0.79 TFLOPs per image, VAE decode 2.5, so a CPU run of
the SD 1.5 rows takes several minutes; compiling the SD 1.5 graphs takes one or two more.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

SIZES = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),  # the rest: diffusers defaults
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        clip=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=49408, max_position_embeddings=77)),
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=32, sample_size=8, norm_num_groups=8),
        vae=dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        clip=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=998, eos_token_id=999)),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_torch(size: str):
    import diffusers
    import transformers

    torch.manual_seed(0)
    cfg = SIZES[size]
    unet = diffusers.UNet2DConditionModel(**cfg["unet"]).eval()
    vae = diffusers.AutoencoderKL(**cfg["vae"]).eval()
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg["clip"])).eval()
    return unet, vae, clip


def load_ours(unet, vae, clip, dtype: str):
    """Our TextToImage on the torch models' weights, through a diffusers folder on disk (params in `dtype`, as the CLI loads them)."""
    from rectflow_jax.models.clip_text import CLIPTextModel
    from rectflow_jax.models.sd_unet import UNet2DConditionModel
    from rectflow_jax.models.vae import AutoencoderKL
    from rectflow_jax.text_to_image import TextToImage, compute_dtype

    kind = compute_dtype(dtype)
    with tempfile.TemporaryDirectory() as folder:
        unet.save_pretrained(Path(folder) / "unet", safe_serialization=True)
        vae.save_pretrained(Path(folder) / "vae", safe_serialization=True)
        clip.save_pretrained(Path(folder) / "text_encoder", safe_serialization=True)
        modules, params = zip(*(loader.from_pretrained(folder, name, dtype=kind, param_dtype=kind) for loader, name in (
            (UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder"))))
        # Copy out of the memory-mapped files before the folder goes.
        params = jax.tree.map(np.array, dict(zip(("unet", "vae", "text_encoder"), params)))
    return TextToImage(*modules, None, params)


def race(contenders: dict, repeats: int) -> dict[str, float]:
    """Milliseconds of each contender, the fastest of `repeats` calls after one warm-up call each.

    Calls alternate so that every contender sees the same background load, and the
    fastest call is kept because load only ever adds time.
    """
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def merge_rows(out: Path, row: dict, key) -> None:
    """Adds `row` to the JSON list in `out`, replacing the row of the same key(row), sorted by key."""
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if key(r) != key(row)] + [row]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(sorted(rows, key=key), indent=2) + "\n")
    print(f"rows -> {out}")


def nchw(x: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device, dtype)


def benchmark(pipe, models, batch: int, device, dtype: str, repeats: int, parts: tuple[str, ...]) -> list[dict]:
    unet_t, vae_t, clip_t = models
    tdtype = TORCH_DTYPES[dtype]
    rng = np.random.default_rng(0)
    latent = pipe.latent_shape()
    width = pipe.text_encoder.hidden_size
    x = rng.standard_normal((batch, *latent), dtype=np.float32)
    context = rng.standard_normal((batch, 77, width), dtype=np.float32)
    ids = rng.integers(0, pipe.text_encoder.vocab_size, (batch, 77)).astype(np.int32)
    t = np.full((batch,), 1000.0, np.float32)
    rows = []
    timings = lambda ours, theirs: dict(race({"ours": ours, "torch": theirs}, repeats), load=os.getloadavg()[0])

    with torch.inference_mode():
        x_t, context_t = nchw(x, device, tdtype), torch.from_numpy(context).to(device, tdtype)
        t_t, ids_t = torch.from_numpy(t).to(device), torch.from_numpy(ids.astype(np.int64)).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def torch_call(fn):
            def call():
                out = fn()
                sync()
                return out
            return call

        if "unet" in parts:
            ours = jax.jit(lambda p, *a: pipe.unet.apply({"params": p}, *a))
            jax_unet = lambda: ours(pipe.params["unet"], x, t, context).block_until_ready()
            torch_unet = torch_call(lambda: unet_t(x_t, t_t, context_t).sample)
            if jax.default_backend() == "gpu":
                hlo = ours.lower(pipe.params["unet"], x, t, context).compile().as_text()
                print(f"UNet graph: {hlo.count('__cudnn$fmha')} fused cuDNN attention calls")
            rows.append(dict(part="UNet forward", **timings(jax_unet, torch_unet),
                             rel_err=rel_err(jax_unet(), torch_unet().float().permute(0, 2, 3, 1).cpu().numpy())))
        if "vae" in parts:
            decode = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method=pipe.vae.decode))
            jax_vae = lambda: decode(pipe.params["vae"], x).block_until_ready()
            torch_vae = torch_call(lambda: vae_t.decode(x_t).sample)
            rows.append(dict(part="VAE decode", **timings(jax_vae, torch_vae),
                             rel_err=rel_err(jax_vae(), torch_vae().float().permute(0, 2, 3, 1).cpu().numpy())))
        scale = vae_t.config.scaling_factor

        def torch_pipe():
            text = clip_t(ids_t).last_hidden_state
            latents = x_t + unet_t(x_t, t_t, text).sample  # one Euler step from t = 0
            images = vae_t.decode(latents / scale).sample
            return ((images.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

        torch_pipe = torch_call(torch_pipe)
        if "pipeline" in parts:
            jax_pipe = lambda: pipe.generate_ids(ids, x, num_steps=1)  # returns host numpy: waits for the device
            rows.append(dict(part="one-step pipeline", **timings(jax_pipe, torch_pipe),
                             rel_err=rel_err(jax_pipe()[1], torch_pipe().numpy())))
        if "lora" in parts or "controlnet" in parts:
            from rectflow_jax.text_to_image import TextToImage

            # torch's column for the LoRA row is its plain one-step image: a fused LoRA leaves the same weights.
            plain = lambda: pipe.generate_ids(ids, x, num_steps=1)
            with tempfile.TemporaryDirectory() as folder:
                if "lora" in parts:
                    adapted = TextToImage(pipe.unet, pipe.vae, pipe.text_encoder, None, dict(pipe.params))
                    adapted.merge_loras([(write_attention_lora(pipe.params["unet"], Path(folder)), 1.0)])
                    times = race({"ours": lambda: adapted.generate_ids(ids, x, num_steps=1), "torch": torch_pipe,
                                  "ours_plain": plain}, repeats)
                    rows.append(dict(part="one-step + LoRA", ours=times["ours"], torch=times["torch"],
                                     vs_plain=times["ours"] / times["ours_plain"], load=os.getloadavg()[0],
                                     rel_err=float("nan")))
                if "controlnet" in parts:
                    import diffusers

                    from rectflow_jax.models.controlnet import ControlNetModel

                    # The control image at the VAE's output size: one embedding stride per VAE level.
                    embedding = (16, 32, 96, 256)[:len(vae_t.config.block_out_channels)]
                    controlnet_t = diffusers.ControlNetModel.from_unet(
                        unet_t, conditioning_embedding_out_channels=embedding).to(device, tdtype).eval()
                    controlnet_t.save_pretrained(Path(folder) / "controlnet", safe_serialization=True)
                    controlled = TextToImage(pipe.unet, pipe.vae, pipe.text_encoder, None, dict(pipe.params))
                    kind = pipe.unet.dtype
                    controlled.attach_controlnet(*ControlNetModel.from_pretrained(Path(folder) / "controlnet",
                                                                                  dtype=kind, param_dtype=kind))
                    height, width = pipe.image_size()
                    image = rng.random((1, height, width, 3), dtype=np.float32)
                    image_t = nchw(np.repeat(image, batch, 0), device, tdtype)

                    def torch_controlled():
                        text = clip_t(ids_t).last_hidden_state
                        down, mid = controlnet_t(x_t, t_t, text, controlnet_cond=image_t, return_dict=False)
                        latents = x_t + unet_t(x_t, t_t, text, down_block_additional_residuals=down,
                                               mid_block_additional_residual=mid).sample
                        images = vae_t.decode(latents / vae_t.config.scaling_factor).sample
                        return ((images.float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).permute(
                            0, 2, 3, 1).cpu()

                    ours_controlled = lambda: controlled.generate_ids(ids, x, num_steps=1, control_image=image)
                    times = race({"ours": ours_controlled, "torch": torch_call(torch_controlled), "ours_plain": plain,
                                  "torch_plain": torch_pipe}, repeats)
                    rows.append(dict(part="one-step + ControlNet", ours=times["ours"], torch=times["torch"],
                                     vs_plain=times["ours"] / times["ours_plain"],
                                     torch_vs_plain=times["torch"] / times["torch_plain"], load=os.getloadavg()[0],
                                     rel_err=rel_err(ours_controlled()[1], torch_controlled().numpy())))
    for row in rows:
        row.update(batch=batch, ratio=row["ours"] / row["torch"], ours_images_per_s=1e3 * batch / row["ours"],
                   torch_images_per_s=1e3 * batch / row["torch"])
    return rows


def write_attention_lora(unet_params, folder: Path, rank: int = 4) -> Path:
    """A random kohya LoRA on every attention projection (to_q, to_k, to_v, to_out.0) of the UNet."""
    from flax import traverse_util

    from rectflow_jax import weights

    rng, tensors = np.random.default_rng(0), {}
    for path, leaf in traverse_util.flatten_dict(unet_params).items():
        if path[-1] == "kernel" and path[-2] in ("to_q", "to_k", "to_v", "to_out_0"):
            name = "lora_unet_" + weights.torch_name(path).removesuffix(".weight").replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = rng.standard_normal((rank, leaf.shape[0])).astype(np.float32)
            tensors[f"{name}.lora_up.weight"] = 0.01 * rng.standard_normal((leaf.shape[1], rank)).astype(np.float32)
            tensors[f"{name}.alpha"] = np.float32(rank)
    file = folder / "attention_lora.safetensors"
    weights.write_safetensors(file, tensors)
    return file


def print_table(rows: list[dict]) -> None:
    print(f"{'part':<20}{'batch':>6}{'ours ms':>11}{'torch ms':>11}{'ours/torch':>12}{'ours img/s':>12}"
          f"{'torch img/s':>13}{'max rel diff':>14}{'load':>7}")
    for r in rows:
        print(f"{r['part']:<20}{r['batch']:>6}{r['ours']:>11.1f}{r['torch']:>11.1f}{r['ratio']:>12.2f}"
              f"{r['ours_images_per_s']:>12.3f}{r['torch_images_per_s']:>13.3f}{r['rel_err']:>14.1e}{r['load']:>7.2f}"
              + (f"   ours vs plain one-step {r['vs_plain']:.2f}" if "vs_plain" in r else "")
              + (f", torch {r['torch_vs_plain']:.2f}" if "torch_vs_plain" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--throughput_batch", type=int, default=0, help="also time the pipeline at this batch")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch's device; JAX uses its default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="unet,vae,pipeline", help="comma-separated: unet, vae, pipeline, lora, controlnet")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)

    unet, vae, clip = build_torch(args.size)
    pipe = load_ours(unet, vae, clip, args.dtype)
    models = tuple(m.to(device) for m in (unet, vae, clip))
    if args.dtype != "float32":
        models = tuple(m.to(TORCH_DTYPES[args.dtype]) for m in models)
    print(f"size {args.size}, dtype {args.dtype}; JAX on {jax.devices()[0].platform} ({jax.device_count()} device), "
          f"torch on {args.device} ({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    parts = tuple(args.parts.split(","))
    rows = benchmark(pipe, models, args.batch, device, args.dtype, args.repeats, parts)
    if args.throughput_batch:
        rows += benchmark(pipe, models, args.throughput_batch, device, args.dtype, args.repeats, ("pipeline",))
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
