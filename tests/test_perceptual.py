"""InstaFlow's loss schedule in the one training loop: L2 on latents, then LPIPS on VAE-decoded images."""

import jax
import numpy as np
import pytest

from rectflow_jax import checkpoint, configlib, perceptual, pipeline, random_folder, weights
from rectflow_jax.models import lpips
from rectflow_jax.models.vae import AutoencoderKL


def random_lpips_file(path):
    """A single safetensors file with a random VGG16 backbone and random positive heads (torch names)."""
    rng = np.random.default_rng(0)
    template = lpips.param_template()
    params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32), template)
    params = {k: (jax.tree.map(np.abs, v) if k.startswith("lin") else v) for k, v in params.items()}
    weights.write_safetensors(path, weights.state_dict_from_params(params))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("perceptual")
    folder = random_folder.write_random_folder(root / "sd", seed=4)
    (root / "prompts.txt").write_text("a photo of a cat\na red house\n")
    config = configlib.load_config("configs/tiny_text_to_image.py")
    config.teacher.pretrained = str(folder)
    config.teacher.num_steps = 2
    config.data.prompts = str(root / "prompts.txt")
    config.data.data_dir = str(root / "tfds")
    config.pairs.update(num_pairs=16, shard_size=16, batch_size=16)
    config.train.update(batch_size=8, num_steps=4, log_every=1, checkpoint_every=4)
    config.stages.distill.train = dict(num_steps=4)
    config.mesh.data = 1
    pipeline.generate_pairs(config, folder, root / "pairs", progress=False)
    return root, folder, config


def test_lpips_loss_is_the_distance_of_the_decoded_latents(setup):
    root, folder, config = setup
    config.flow.lpips.backbone = str(random_lpips_file(root / "lpips.safetensors"))
    loss, frozen = perceptual.lpips_latent_loss(config, str(folder))
    vae, _ = AutoencoderKL.from_pretrained(folder, "vae")
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32) for _ in range(2))
    decode = lambda z: vae.apply({"params": frozen["vae"]}, z / vae.scaling_factor, method=vae.decode)
    expected = lpips.lpips_distance(frozen["lpips"], decode(a), decode(b))
    got = jax.jit(loss)(a, b, frozen)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(got.min()) > 0 and float(jax.jit(loss)(a, a, frozen).max()) < 1e-6
    grad = jax.jit(jax.grad(lambda z: loss(z, b, frozen).sum()))(a)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


@pytest.mark.slow
def test_distillation_switches_from_l2_to_lpips(setup, tmp_path):
    root, folder, config = setup
    config.flow.lpips.backbone = str(random_lpips_file(root / "lpips.safetensors"))
    config.stages.distill.flow = dict(loss="l2", loss_switch=dict(loss="lpips", step=2))
    history = []
    original = pipeline.train.train

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        history.extend(result.history)
        return result

    pipeline.train.train = recording
    try:
        pipeline.train_stage(config, tmp_path / "distill", "distill", pairs_dir=root / "pairs", teacher_dir=folder,
                             progress=False)
    finally:
        pipeline.train.train = original
    losses = [h["loss"] for h in history]
    print(f"\n[perceptual] losses by step: {losses}")
    assert len(losses) == 4 and all(np.isfinite(losses))
    # L2 on these latents is in the hundreds (the random teacher's latents are large); LPIPS is O(1).
    assert min(losses[:2]) > 10 * max(losses[2:])
    meta, step = checkpoint.read_meta(tmp_path / "distill")
    assert step == 4 and meta["run"]["flow"]["loss_switch"] == {"loss": "lpips", "step": 2}
