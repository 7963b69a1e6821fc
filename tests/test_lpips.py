"""Parity of the Flax LPIPS-VGG with the `lpips` package, its gradient through the VAE, its weight I/O."""

import functools
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import weights
from rectflow_jax.models import lpips as ours
from rectflow_jax.models.vae import AutoencoderKL

torch = pytest.importorskip("torch")

# torchvision's VGG16 config "D": conv widths, "M" a 2x2 max pool. Written as torchvision
# writes it (not as the indices in ours.SLICES), so the stand-in below checks those indices.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class StandInVGG16(torch.nn.Module):
    """torchvision's vgg16() as far as lpips uses it: `features`, a Sequential of conv/ReLU/pool."""

    def __init__(self, pretrained=False, **_):
        super().__init__()
        assert not pretrained, "the stand-in has no weights"
        layers, width = [], 3
        for v in VGG16_CONFIG:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [torch.nn.Conv2d(width, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
                width = v
        self.features = torch.nn.Sequential(*layers)


def real_torchvision():
    try:
        import torchvision
    except Exception:  # missing, or PyPI's build that fails beside the CPU torch ('torchvision::nms')
        return None
    return torchvision


def import_lpips():
    """lpips, and where its VGG16 came from.

    lpips imports torchvision when it is imported, and uses only `models.vgg16().features`
    for net='vgg'. PyPI's torchvision does not load beside the CPU build of torch 2.13.0
    these machines use, so where there is no working torchvision a stand-in with its
    layout is lent for lpips' import alone (and taken out of sys.modules again).
    """
    if real_torchvision() is not None:
        return pytest.importorskip("lpips"), "torchvision"
    stand_in = types.ModuleType("torchvision")
    stand_in.models = types.ModuleType("torchvision.models")
    stand_in.models.vgg16 = StandInVGG16
    saved = {name: sys.modules.pop(name) for name in ("torchvision", "torchvision.models") if name in sys.modules}
    sys.modules.update({"torchvision": stand_in, "torchvision.models": stand_in.models})
    try:
        module = pytest.importorskip("lpips")
    finally:
        for name in ("torchvision", "torchvision.models"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return module, "torchvision" if module.pn.tv is not stand_in.models else "a stand-in for torchvision"


lpips, VGG_SOURCE = import_lpips()


@pytest.fixture(scope="module")
def reference():
    """lpips' LPIPS-VGG with a random backbone and its shipped heads.

    Every backbone tensor is redrawn (biases too: torchvision's are zero, which would hide
    a wrong bias mapping), so the torchvision and stand-in backbones are the same.
    """
    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
    return model


def backbone_state(model):
    """lpips keeps torchvision's indices inside its slices (`net.slice3.12.weight`): back to `features.12.weight`."""
    state = {}
    for name, tensor in model.net.state_dict().items():
        _slice, index, leaf = name.split(".")
        state[f"features.{index}.{leaf}"] = tensor.detach().clone()
    return state


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The reference's backbone as .pth and .safetensors, and its heads as .safetensors."""
    folder = tmp_path_factory.mktemp("lpips")
    state = backbone_state(reference)
    assert len(state) == 26  # 13 convs
    torch.save(state, folder / "vgg16.pth")
    weights.write_safetensors(folder / "vgg16.safetensors", {k: v.numpy() for k, v in state.items()})
    heads = {f"lin{k}.model.1.weight": getattr(reference, f"lin{k}").model[1].weight.detach().numpy()
             for k in range(5)}
    weights.write_safetensors(folder / "heads.safetensors", heads)
    return dict(pth=folder / "vgg16.pth", safetensors=folder / "vgg16.safetensors",
                heads=folder / "heads.safetensors", folder=folder)


@pytest.fixture(scope="module")
def params(files):
    return ours.load_lpips_params(files["safetensors"], files["heads"])


@functools.cache
def jitted(dtype=jnp.float32):
    return jax.jit(functools.partial(ours.lpips_distance, dtype=dtype))


def images(shape, seed):
    """Two NCHW float32 batches in [-1, 1]: the second a perturbed copy of the first, as in a loss."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, shape), -1, 1).astype(np.float32)
    return a, b


def nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def rel_err(got, ref):
    err = float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"\n[lpips] {test}: max rel |diff| {err:.2e}, reference {np.round(ref, 4).tolist()}, VGG16 from {VGG_SOURCE}")
    return err


@pytest.mark.parametrize("size", [(64, 64), (40, 56)])
@pytest.mark.parametrize("source", ["pth", "safetensors"])
def test_parity_with_lpips(reference, files, size, source):
    loaded = ours.load_lpips_params(files[source], None if source == "pth" else files["heads"],
                                    allow_pickle=source == "pth")  # .pth: heads from the lpips package
    a, b = images((3, 3, *size), seed=size[0])
    with torch.no_grad():
        ref = reference(torch.from_numpy(a), torch.from_numpy(b)).numpy().reshape(-1)
    got = jitted()(loaded, nhwc(a), nhwc(b))
    assert got.shape == (3,) and got.dtype == jnp.float32
    assert rel_err(got, ref) <= 1e-5


def test_vgg_layout_matches_torchvision():
    """ours.SLICES against torchvision's own vgg16().features, where torchvision loads."""
    torchvision = real_torchvision()
    if torchvision is None:
        pytest.skip("no working torchvision here (the parity tests used a stand-in with its layout)")
    features = torchvision.models.vgg16(weights=None).features
    convs = [(i, layer.out_channels) for i, layer in enumerate(features) if isinstance(layer, torch.nn.Conv2d)]
    pools = [i for i, layer in enumerate(features) if isinstance(layer, torch.nn.MaxPool2d)]
    assert convs == [conv for convs_ in ours.SLICES for conv in convs_]
    assert pools[:4] == [convs_[0][0] - 1 for convs_ in ours.SLICES[1:]]


def test_identical_images_are_at_distance_zero(params):
    a, _ = images((2, 3, 32, 32), seed=1)
    # Not exactly 0: XLA's CPU conv may round the two halves of the joint batch apart.
    assert float(jnp.abs(jitted()(params, nhwc(a), nhwc(a))).max()) < 1e-12


def test_bfloat16_compute_stays_close(params):
    a, b = images((2, 3, 32, 32), seed=2)
    full = np.asarray(jitted()(params, nhwc(a), nhwc(b)))
    half = jitted(jnp.bfloat16)(params, nhwc(a), nhwc(b))
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), full, rtol=0.05)


def test_gradient_through_vae_decoder_is_finite_and_nonzero(params):
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    z_a, z_b = jax.random.normal(jax.random.key(1), (2, 2, 8, 8, 4))  # -> 16x16 images, relu5_3 1x1
    # Only the decoder's params, initialised under jit: eager init of the whole VAE costs seconds more.
    vae_params = jax.jit(lambda key: vae.init(key, z_a, method=vae.decode))(jax.random.key(0))["params"]

    def loss(z):
        decode = lambda latents: vae.apply({"params": vae_params}, latents, method=vae.decode)
        return ours.lpips_distance(params, decode(z), decode(z_b)).sum()

    value, grad = jax.jit(jax.value_and_grad(loss))(z_a)
    assert grad.shape == z_a.shape
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0


def test_unit_normalize_matches_lpips_at_the_scale_of_eps():
    """Features near eps (1e-10) in size, where the eps and its place decide the value; and an all-zero pixel."""
    rng = np.random.default_rng(4)
    features = rng.normal(0, 1, (2, 4, 5, 16)).astype(np.float32) * np.float32(1e-10)
    features[0, 1, 2] = 0.0
    ref = lpips.normalize_tensor(torch.from_numpy(features.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours.unit_normalize(jnp.asarray(features))), ref, rtol=1e-5, atol=1e-7)


def test_unit_normalize_has_finite_gradient_at_zero_features():
    features = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(1.0)
    grad = jax.grad(lambda f: ours.unit_normalize(f).sum())(features)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_converted_single_file_round_trip(files, params):
    out = files["folder"] / "converted" / "lpips_vgg.safetensors"
    with pytest.raises(SystemExit) as refused:  # the .pth needs --allow_pickle
        ours.main(["--backbone", str(files["pth"]), "--heads", str(files["heads"]), "--out", str(out)])
    assert refused.value.code == 2 and not out.exists()
    ours.main(["--backbone", str(files["pth"]), "--heads", str(files["heads"]), "--out", str(out), "--allow_pickle"])
    stored = weights.read_safetensors(out)
    assert sorted(n for n in stored if n.startswith("lin")) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert stored["lin2.model.1.weight"].shape == (1, 256, 1, 1) and stored["features.0.weight"].shape == (64, 3, 3, 3)
    alone = ours.load_lpips_params(out)  # heads=None: taken from the file itself
    a, b = images((2, 3, 32, 32), seed=3)
    np.testing.assert_array_equal(np.asarray(jitted()(alone, nhwc(a), nhwc(b))),
                                  np.asarray(jitted()(params, nhwc(a), nhwc(b))))


def test_missing_backbone_file_names_the_option(tmp_path):
    with pytest.raises(weights.WeightLoadError, match=r"nope\.safetensors.*flow\.lpips\.backbone"):
        ours.load_lpips_params(tmp_path / "nope.safetensors", tmp_path / "heads.safetensors")


def test_missing_heads_file_names_the_option(files, tmp_path):
    with pytest.raises(weights.WeightLoadError, match=r"nope\.safetensors.*flow\.lpips\.heads"):
        ours.load_lpips_params(files["safetensors"], tmp_path / "nope.safetensors")


def test_pickle_needs_allow_pickle(files):
    with pytest.raises(weights.WeightLoadError, match=r"vgg16\.pth.*run code.*allow_pickle"):
        ours.load_lpips_params(files["pth"], files["heads"])


def test_default_heads_are_a_pickle_too(files):
    with pytest.raises(weights.WeightLoadError, match=r"vgg\.pth.*flow\.lpips\.heads.*allow_pickle"):
        ours.load_lpips_params(files["safetensors"])


@pytest.mark.parametrize("defect, named", [("drop", r"missing 1: features\.28\.bias"),
                                           ("reshape", r"mis-shaped 1: features\.10\.weight")])
def test_bad_backbone_tensors_are_named(files, tmp_path, defect, named):
    state = weights.read_safetensors(files["safetensors"])
    state = {n: np.array(v) for n, v in state.items()}
    if defect == "drop":
        del state["features.28.bias"]
    else:
        state["features.10.weight"] = state["features.10.weight"][:, :64]
    weights.write_safetensors(tmp_path / "bad.safetensors", state)
    with pytest.raises(weights.WeightLoadError, match=named):
        ours.load_lpips_params(tmp_path / "bad.safetensors", files["heads"])


def test_too_small_images_are_refused(params):
    small = jnp.zeros((1, 8, 32, 3))
    with pytest.raises(ValueError, match="at least 16x16"):
        ours.lpips_distance(params, small, small)
