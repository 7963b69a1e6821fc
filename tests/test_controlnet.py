"""The Flax ControlNet and the UNet's residual inputs against diffusers on random weights; control images
against diffusers' VaeImageProcessor."""

import functools
import gc
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from rectflow_jax import parallel, random_folder, weights  # noqa: E402
from rectflow_jax.control_image import ControlImageError, load_control_image  # noqa: E402
from rectflow_jax.models.controlnet import ControlNetModel  # noqa: E402
from rectflow_jax.models.sd_unet import UNet2DConditionModel  # noqa: E402

UNET_KEYS_ONLY = ("up_block_types", "sample_size")  # UNet config keys a ControlNet has not
TINY = {
    # SD 1.x layout; control image 2x the latent (the tiny random pipeline's VAE factor).
    "sd1": (dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                 cross_attention_dim=32, norm_num_groups=8),
            dict(conditioning_embedding_out_channels=(8, 16))),
    # SD 2.x layout, two layers per block, other time embedding; BGR control images through a 4x
    # embedding; global_pool_conditions: (B, 1, 1, C) residuals, broadcast onto the skips.
    "sd2_bgr_pool": (dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
                          up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=2, attention_head_dim=(2, 4),
                          cross_attention_dim=48, norm_num_groups=16, use_linear_projection=True,
                          upcast_attention=True, flip_sin_to_cos=False, freq_shift=1),
                     dict(conditioning_embedding_out_channels=(8, 16, 16), controlnet_conditioning_channel_order="bgr",
                          global_pool_conditions=True)),
}
# The smallest ControlNet, for what needs a compile of its own.
MINI = dict(block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",), layers_per_block=1,
            attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4, conditioning_embedding_out_channels=(4, 8))
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # as tests/test_sd_unet.py
SCALE = 0.7


def _controlnet_config(unet_cfg, extra):
    return {**{k: v for k, v in unet_cfg.items() if k not in UNET_KEYS_ONLY}, **extra}


def _perturbed(cls, seed, **config):
    """A diffusers `cls(**config)` with every parameter perturbed, so the zero-initialised convs
    (and any mis-mapped tensor) show. Seeded before construction: its init draws too."""
    torch.manual_seed(seed)
    model = cls(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(cn_cfg, batch=2, latent=8, tokens=7, seed=0):
    rng = np.random.default_rng(seed)
    factor = 2 ** (len(cn_cfg["conditioning_embedding_out_channels"]) - 1)
    sample = rng.standard_normal((batch, latent, latent, 4), dtype=np.float32)
    timesteps = np.array([999.0, 10.5][:batch], np.float32)
    context = rng.standard_normal((batch, tokens, cn_cfg["cross_attention_dim"]), dtype=np.float32)
    cond = rng.random((batch, latent * factor, latent * factor, cn_cfg.get("conditioning_channels", 3)),
                      dtype=np.float32)
    return sample, timesteps, context, cond


nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()


def _torch_controlled(controlnet, unet, sample, timesteps, context, cond, scale=SCALE):
    """diffusers: (residuals NHWC, mid NHWC, UNet output with them NHWC)."""
    with torch.no_grad():
        down, mid = controlnet(nchw(sample), torch.from_numpy(timesteps), encoder_hidden_states=torch.from_numpy(context),
                               controlnet_cond=nchw(cond), conditioning_scale=scale, return_dict=False)
        out = unet(nchw(sample), torch.from_numpy(timesteps), torch.from_numpy(context),
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    return [nhwc(d) for d in down], nhwc(mid), nhwc(out)


@functools.cache  # modules hash by config: one compile per configuration across tests
def _jitted_apply(module):
    return jax.jit(module.apply)


def _flax_controlled(controlnet, cn_params, unet, unet_params, sample, timesteps, context, cond, scale=SCALE):
    down, mid = _jitted_apply(controlnet)({"params": cn_params}, sample, timesteps, context, cond, scale)
    out = _jitted_apply(unet)({"params": unet_params}, sample, timesteps, context, down, mid)
    return [np.asarray(d) for d in down], np.asarray(mid), np.asarray(out)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (folder with unet/ and controlnet/, inputs, torch (down, mid, out), torch UNet output alone)."""
    cache = {}

    def get(name):
        if name not in cache:
            unet_cfg, extra = TINY[name]
            cn_cfg = _controlnet_config(unet_cfg, extra)
            folder = tmp_path_factory.mktemp(name)
            unet = _perturbed(diffusers.UNet2DConditionModel, 0, **unet_cfg)
            controlnet = _perturbed(diffusers.ControlNetModel, 1, **cn_cfg)
            unet.save_pretrained(folder / "unet", safe_serialization=True)
            controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
            inputs = _inputs(cn_cfg)
            with torch.no_grad():
                plain = nhwc(unet(nchw(inputs[0]), torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2])).sample)
            cache[name] = folder, inputs, _torch_controlled(controlnet, unet, *inputs), plain
        return cache[name]

    return get


def _load(folder):
    unet, unet_params = UNet2DConditionModel.from_pretrained(folder)
    controlnet, cn_params = ControlNetModel.from_pretrained(folder, "controlnet")
    return controlnet, cn_params, unet, unet_params


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(reference, name):
    folder, inputs, (t_down, t_mid, t_out), plain = reference(name)
    down, mid, out = _flax_controlled(*_load(folder), *inputs)
    assert len(down) == len(t_down) and all(d.dtype == np.float32 for d in down)
    assert [d.shape for d in down] == [d.shape for d in t_down] and mid.shape == t_mid.shape
    rel_down = max(_rel(d, t) for d, t in zip(down, t_down))
    rel_mid, rel_out = _rel(mid, t_mid), _rel(out, t_out)
    effect = _rel(t_out, plain)  # how much the residuals move diffusers' UNet output
    print(f"\n[controlnet] tiny {name}: residuals max rel {rel_down:.2e}, mid {rel_mid:.2e}, "
          f"controlled UNet {rel_out:.2e} (residuals move the output by {effect:.2f} relative)")
    assert effect > 1e-2
    assert max(rel_down, rel_mid, rel_out) <= 1e-4


def test_two_controlnets_match_diffusers_multicontrolnet(reference, tmp_path):
    """teachers.SDTeacher.velocity with two ControlNets (their residuals summed) against diffusers'
    MultiControlNetModel feeding its UNet, each ControlNet with its own image and scale."""
    from rectflow_jax import teachers

    folder, (sample, t, context, cond), (_, _, one_out), _ = reference("sd1")
    unet_cfg, extra = TINY["sd1"]
    second = _perturbed(diffusers.ControlNetModel, 2, **_controlnet_config(unet_cfg, extra))
    second.save_pretrained(tmp_path / "second", safe_serialization=True)
    cond2 = np.random.default_rng(5).random(cond.shape, dtype=np.float32)
    scales = (SCALE, 0.4)
    first_t = diffusers.ControlNetModel.from_pretrained(folder / "controlnet").eval()
    unet_t = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    multi = diffusers.MultiControlNetModel([first_t, second])
    with torch.no_grad():
        down, mid = multi(nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                          controlnet_cond=[nchw(cond), nchw(cond2)], conditioning_scale=list(scales),
                          return_dict=False)
        expected = nhwc(unet_t(nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
                               down_block_additional_residuals=down, mid_block_additional_residual=mid).sample)

    controlnet, cn_params, unet, unet_params = _load(folder)
    controlnet2, cn2_params = ControlNetModel.from_pretrained(tmp_path / "second")
    teacher = teachers.SDTeacher(unet, None, {}, "velocity", None, "", "two controlnets", {},
                                 controlnets=(controlnet, controlnet2))
    control = (teachers.Control(cn_params, cond, np.float32(scales[0])),
               teachers.Control(cn2_params, cond2, np.float32(scales[1])))
    our_time = 1.0 - t / 1000.0  # a velocity UNet is called at (1 - t) * 1000
    ours = np.asarray(jax.jit(lambda c: teacher.velocity(unet_params, None, sample, our_time, context, c))(control))
    rel, effect = _rel(ours, expected), _rel(expected, one_out)
    print(f"\n[controlnet] two ControlNets vs diffusers MultiControlNetModel: {rel:.2e} relative "
          f"(the second moves the output by {effect:.2f})")
    assert effect > 1e-2 and rel <= 1e-4
    with pytest.raises(teachers.IncompatibleTeacher, match="1 control inputs for 2"):
        teacher.velocity(unet_params, None, sample, our_time, context, control[:1])


def test_scale_is_linear_and_traceable(reference):
    folder, (sample, t, context, cond), _, _ = reference("sd1")
    controlnet, params, _, _ = _load(folder)
    scaled = lambda s: _jitted_apply(controlnet)({"params": params}, sample, t, context, cond, s)  # s traced
    (d1, m1), (d2, m2), (d0, m0) = scaled(1.0), scaled(2.0), scaled(0.0)
    for one, two, zero in zip((*d1, m1), (*d2, m2), (*d0, m0)):
        assert np.max(np.abs(np.asarray(one))) > 0 and not np.any(np.asarray(zero))
        np.testing.assert_allclose(two, 2 * np.asarray(one), rtol=1e-6, atol=1e-7)


def test_scalar_timestep_and_one_control_image_broadcast():
    module = ControlNetModel.from_config(MINI)
    params = random_folder.random_params(module, jax.random.key(0))
    sample, t, context, cond = _inputs(MINI, latent=4)
    run = jax.jit(module.apply)
    broadcast = run({"params": params}, sample, 321.0, context, cond[:1])
    explicit = run({"params": params}, sample, np.full(2, 321.0, np.float32), context, np.repeat(cond[:1], 2, 0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), broadcast, explicit)


def test_unet_zero_residuals_are_the_plain_unet(reference):
    folder, (sample, t, context, _), (t_down, t_mid, _), plain = reference("sd1")
    _, _, unet, unet_params = _load(folder)
    zeros = lambda a: np.zeros(a.shape, np.float32)
    # The residual shapes of the parity test: its compiled UNet is reused.
    out = _jitted_apply(unet)({"params": unet_params}, sample, t, context, [zeros(d) for d in t_down], zeros(t_mid))
    assert _rel(np.asarray(out), plain) <= 1e-4


def test_unet_residual_errors_are_clear(reference):
    folder, (sample, t, context, _), _, _ = reference("sd1")
    _, _, unet, unet_params = _load(folder)
    down = [np.zeros((2, 8, 8, 32), np.float32)] * 2 + [np.zeros((2, 4, 4, 32), np.float32),
                                                        np.zeros((2, 4, 4, 64), np.float32)]
    mid = np.zeros((2, 4, 4, 64), np.float32)
    call = lambda d, m: jax.eval_shape(lambda: unet.apply({"params": unet_params}, sample, t, context, d, m))
    call(down, mid)  # the right shapes pass
    with pytest.raises(ValueError, match="has 3 tensors; this UNet makes 4 skips"):
        call(down[:3], mid)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[2\] has shape \(2, 4, 4, 64\)"):
        call(down[:2] + [down[3], down[3]], mid)
    with pytest.raises(ValueError, match="mid_block_additional_residual has shape"):
        call(down, mid[:, :2])
    with pytest.raises(ValueError, match="pass both or neither"):
        call(down, None)
    with pytest.raises(ValueError, match="pass both or neither"):
        call(None, mid)


def test_controlnet_input_errors_are_clear():
    controlnet = ControlNetModel.from_config(_controlnet_config(*TINY["sd1"]))
    sample, t, context, cond = _inputs(_controlnet_config(*TINY["sd1"]))
    run = lambda c: jax.eval_shape(lambda: controlnet.init(jax.random.key(0), sample, t, context, c))
    with pytest.raises(ValueError, match=r"controlnet_cond must be \(B or 1, 16, 16, 3\).*2x the latent size"):
        run(cond[:, :8, :8])
    with pytest.raises(ValueError, match="controlnet_cond must be"):
        run(cond[..., :1])


@pytest.mark.parametrize("name", list(TINY))
def test_export_loads_in_diffusers(tmp_path, name):
    cn_cfg = _controlnet_config(*TINY[name])
    module = ControlNetModel.from_config({"_class_name": "ControlNetModel", **cn_cfg})
    params = random_folder.random_params(module, jax.random.key(3))
    module.save_pretrained(params, tmp_path / "cn")
    saved = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert saved["_class_name"] == "ControlNetModel" and saved["conditioning_embedding_out_channels"] == list(
        cn_cfg["conditioning_embedding_out_channels"])
    model = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn").eval()
    sample, t, context, cond = _inputs(cn_cfg)
    with torch.no_grad():
        t_down, t_mid = model(nchw(sample), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                              controlnet_cond=nchw(cond), conditioning_scale=SCALE, return_dict=False)
    down, mid = _jitted_apply(module)({"params": params}, sample, t, context, cond, SCALE)
    rel = max(_rel(np.asarray(a), nhwc(b)) for a, b in zip((*down, mid), (*t_down, t_mid)))
    print(f"\n[controlnet] export {name}: max rel |diff| {rel:.2e}")
    assert rel <= 1e-4
    again, again_params = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert again.config == module.config
    assert jax.tree.all(jax.tree.map(np.array_equal, again_params, params))


def test_from_unet_matches_diffusers(reference, tmp_path):
    folder = reference("sd1")[0]
    channels = (8, 16)
    torch_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    torch_cn = diffusers.ControlNetModel.from_unet(torch_unet, conditioning_embedding_out_channels=channels,
                                                   conditioning_channels=2)
    unet, unet_params = UNet2DConditionModel.from_pretrained(folder)
    module, params = ControlNetModel.from_unet(unet, unet_params, 2, conditioning_embedding_out_channels=channels)

    public = lambda config: json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
    assert public(diffusers.ControlNetModel.from_config(module.config).config) == public(torch_cn.config)
    ours = weights.state_dict_from_params(params)
    theirs = {k: v.numpy() for k, v in torch_cn.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    unet_state = weights.read_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors")
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    for name in ours:
        if name.startswith(zero):
            assert not np.any(ours[name]) and not np.any(theirs[name]), name
        elif name.startswith("controlnet_cond_embedding."):  # random in both, within torch's Conv2d bound
            layer = name.rsplit(".", 1)[0]
            bound = 1 / np.sqrt(np.prod(theirs[layer + ".weight"].shape[1:]))
            assert np.any(ours[name]) and max(np.max(np.abs(ours[name])), np.max(np.abs(theirs[name]))) <= bound
            if name.endswith("weight"):  # uniform: std bound / sqrt(3)
                assert abs(np.std(ours[name]) * np.sqrt(3) / bound - 1) < 0.2, name
        else:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
            np.testing.assert_array_equal(ours[name], unet_state[name], err_msg=name)


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("layers_per_block", [1, 2]),
                                        ("mid_block_type", "UNetMidBlock2D"), ("only_cross_attention", True),
                                        ("controlnet_conditioning_channel_order", "brg"),
                                        ("addition_embed_type", "text_time"), ("sample_size", 64)])
def test_unsupported_config_is_named(key, value):
    with pytest.raises(weights.UnsupportedConfigError, match=key):
        ControlNetModel.from_config({**_controlnet_config(*TINY["sd1"]), key: value})


def test_from_unet_refuses_what_has_no_controlnet():
    unet_cfg = TINY["sd1"][0]
    with pytest.raises(weights.UnsupportedConfigError, match="mid_block_type"):
        ControlNetModel.from_unet(UNet2DConditionModel.from_config({**unet_cfg, "mid_block_type": None}), None)
    with pytest.raises(weights.UnsupportedConfigError, match="conv_in_kernel"):
        ControlNetModel.from_unet(UNet2DConditionModel.from_config({**unet_cfg, "conv_in_kernel": 1}), None)


def test_every_param_has_axis_names_the_rules_know():
    module = ControlNetModel.from_config(_controlnet_config(*TINY["sd1"]))
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    known = {axis for axis, _ in parallel.logical_rules()}
    for path, spec in traverse_util.flatten_dict(nn.get_partition_spec(boxed)).items():
        assert {axis for axis in spec if axis is not None} <= known, (path, spec)
        if path[-1] == "kernel":
            assert any(axis is not None for axis in spec), path


def test_random_controlnet_folder_loads_in_both(tmp_path):
    root = random_folder.write_random_folder(tmp_path / "sd")
    out = random_folder.write_random_controlnet(tmp_path / "cn", root, seed=1)
    config = json.loads((out / "config.json").read_text())
    assert config["conditioning_embedding_out_channels"] == [16, 32]  # the tiny VAE's factor 2
    model = diffusers.ControlNetModel.from_pretrained(out).eval()
    module, params = ControlNetModel.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == sum(int(p.size) for p in jax.tree.leaves(params))
    unet, _ = UNet2DConditionModel.from_pretrained(root)
    assert module.block_out_channels == unet.block_out_channels and module.cross_attention_dim == 32
    zero_convs = {k: v for k, v in params.items() if k.startswith("controlnet_") and k != "controlnet_cond_embedding"}
    assert len(zero_convs) == 5 and all(np.std(np.asarray(p["kernel"])) > 0.1 for p in zero_convs.values())
    again = random_folder.write_random_controlnet(tmp_path / "cn2", root / "unet", seed=1,
                                                  conditioning_embedding_out_channels=(16, 32))
    assert (again / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "diffusion_pytorch_model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- control images


def _diffusers_control(image, height=None, width=None):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    return nhwc(processor.preprocess(image, height=height, width=width).to(torch.float32))


def _pil(mode, size=(53, 37), seed=0):
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode) if mode != "P" else rgba.convert("RGB").quantize(16)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("size", [(None, None), (64, 48), (16, 24)])
def test_control_image_matches_diffusers_pil(mode, size):
    image = _pil(mode)
    ours = load_control_image(image, *size)
    expected = _diffusers_control(image, *size)
    assert ours.dtype == np.float32 and ours.shape == expected.shape and ours.shape[-1] == 3
    np.testing.assert_array_equal(ours, expected)
    if size == (None, None):
        assert ours.shape == (1, 32, 48, 3)  # 37 x 53 rounded down to multiples of 8


def test_control_image_from_path_matches_diffusers_load_image(tmp_path):
    from diffusers.utils import load_image

    file = tmp_path / "edges.png"
    _pil("RGBA", (70, 45)).save(file)
    for size in ((None, None), (64, 64)):
        np.testing.assert_array_equal(load_control_image(file, *size),
                                      _diffusers_control(load_image(str(file)), *size))
        np.testing.assert_array_equal(load_control_image(str(file), *size),
                                      _diffusers_control(load_image(str(file)), *size))


@pytest.mark.parametrize("shape, size", [((37, 53, 3), (None, None)), ((1, 40, 24, 3), (64, 48)),
                                         ((30, 30, 3), (24, 40)), ((16, 16, 3), (16, 16))])
def test_control_image_float_array_matches_diffusers(shape, size):
    array = np.random.default_rng(1).random(shape)  # float64, as a user may pass
    np.testing.assert_array_equal(load_control_image(array, *size), _diffusers_control(array, *size))


def test_control_image_uint8_array_reads_as_its_image():
    array = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for a in (array, array[None]):
        np.testing.assert_array_equal(load_control_image(a, 32, 48), _diffusers_control(Image.fromarray(array), 32, 48))
    gray = array[..., 0]
    np.testing.assert_array_equal(load_control_image(gray[..., None]), _diffusers_control(Image.fromarray(gray)))


def test_control_image_errors(tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    cases = [
        (tmp_path / "missing.png", {}, "does not exist"),
        (tmp_path / "not_an_image.png", {}, "not a readable image"),
        (np.zeros((16, 16, 2), np.float32), {}, "must be RGB"),
        (np.zeros((16, 16, 2), np.uint8), {}, "uint8 control image must be"),
        (np.zeros((2, 16, 16, 3), np.float32), {}, "must be RGB"),
        (np.full((16, 16, 3), 255.0, np.float32), {}, r"values in \[0, 1\]"),
        (np.zeros((16, 16, 3), np.int32), {}, "uint8 or float"),
        (_pil("RGB"), {"height": 36}, "height must be a positive multiple of 8"),
        (_pil("RGB"), {"width": 0}, "width must be a positive multiple of 8"),
        (_pil("RGB", (5, 40)), {}, "width 5 is below the VAE factor 8"),
        ([1, 2, 3], {}, "a path, a PIL image or a numpy array"),
    ]
    for image, kwargs, message in cases:
        with pytest.raises(ControlImageError, match=message):
            load_control_image(image, **kwargs)
    assert issubclass(ControlImageError, ValueError)


# ----------------------------------------------------------------------------- SD 1.5 sizes


@pytest.mark.slow
def test_sd15_size_matches_diffusers(tmp_path):
    unet = _perturbed(diffusers.UNet2DConditionModel, 0, **SD15)
    # diffusers' default ControlNetModel is SD 1.5's but for the text width (768) and heads.
    controlnet = _perturbed(diffusers.ControlNetModel, 1, cross_attention_dim=768, attention_head_dim=8)
    cn_cfg = {"cross_attention_dim": 768, "conditioning_embedding_out_channels": (16, 32, 96, 256)}
    inputs = _inputs(cn_cfg, batch=1, latent=16, tokens=77)  # 16x16 latents, a 128x128 control image
    expected = _torch_controlled(controlnet, unet, *inputs)
    with torch.no_grad():
        plain = nhwc(unet(nchw(inputs[0]), torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2])).sample)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    controlnet.save_pretrained(tmp_path / "controlnet", safe_serialization=True)
    del unet, controlnet
    gc.collect()

    got = _flax_controlled(*_load(tmp_path), *inputs)
    t_down, t_mid, t_out = expected
    rel_down = max(_rel(d, t) for d, t in zip(got[0], t_down))
    rel_mid, rel_out = _rel(got[1], t_mid), _rel(got[2], t_out)
    print(f"\n[controlnet] SD 1.5 size ({len(t_down)} residuals, 16x16 latents, 128x128 control): residuals max rel "
          f"{rel_down:.2e}, mid {rel_mid:.2e}, controlled UNet {rel_out:.2e} (max|torch| {np.max(np.abs(t_out)):.3f}; the residuals move it by "
          f"{_rel(t_out, plain):.2f} relative)")
    assert max(rel_down, rel_mid, rel_out) <= 1e-4
