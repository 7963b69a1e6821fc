"""Parity of the Flax FID Inception-v3 with pytorch-fid on random weights, the FID itself, its weight I/O.

pytorch-fid's network is built as published (`InceptionV3()`: resize to 299, scale to
[-1, 1], pool features), its weight download replaced by a random state dict. Every
tensor is redrawn, BatchNorm's running statistics and affine too, so that a wrong
eps, a swapped mean/var or a folding mistake changes the features.
"""

import hashlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fid_reference
from rectflow_jax import evaluate, weights
from rectflow_jax.models import inception as ours

torch = pytest.importorskip("torch")
reference_inception, reference_fid = fid_reference.import_pytorch_fid()

FEATURE_TOLERANCE = 1e-4  # max |ours - ref| / max |ref| over a batch of pool features
FID_TOLERANCE = 1e-3      # relative
# The FID check: 2 x FID_IMAGES images of FID_SIZE px, fed at that size (resize_input=False,
# so Mixed_7 is 2x2 and an image costs 1/8 of a 299 one), compared on FID_DIMS of the 2048
# features, spread over all four branches of Mixed_7c and taken among those that no image
# zeroes (random weights leave ~30% of them dead), so that both covariances have full rank:
# pytorch-fid's sqrtm is then well-defined, and cheap (at 2048-d it takes ~50 s here).
# Ours runs in batches of FID_BATCH: XLA's compile time grows with the batch.
FID_SIZE, FID_IMAGES, FID_DIMS, FID_BATCH = 107, 64, 32, 8


def random_fid_state(seed=0):
    """A state dict with the names and shapes of pytorch-fid's pt_inception file, every tensor random.

    Taken from torchvision's Inception3 (1008 classes, no aux head): pytorch-fid's FID
    blocks subclass torchvision's and keep their layers, and fid_inception_v3 loads the
    dict strictly, so a wrong name or shape here would fail there.
    """
    import torchvision

    skeleton = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda shape, low, high: low + (high - low) * torch.rand(shape, generator=generator)
    state = {}
    for name, tensor in skeleton.state_dict().items():
        if name.endswith("num_batches_tracked"):
            value = tensor.clone()
        elif name.endswith("weight") and tensor.ndim > 1:  # convs (He scale, so activations stay O(1)) and fc
            value = torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5
        elif name.endswith("bn.weight"):
            value = uniform(tensor.shape, 0.5, 1.5)
        elif name.endswith("running_var"):
            value = uniform(tensor.shape, 0.5, 2.0)
        else:  # bn.bias, running_mean, fc.bias
            value = 0.2 * torch.randn(tensor.shape, generator=generator)
        state[name] = value
    return state


@pytest.fixture(scope="module")
def state():
    return random_fid_state()


@pytest.fixture(scope="module")
def reference(state):
    """pytorch-fid's InceptionV3() (resize_input and normalize_input on, 2048-d block) with `state`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference_inception, "load_state_dict_from_url", lambda *_, **__: state)
        return reference_inception.InceptionV3().eval()


@pytest.fixture(scope="module")
def files(state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fid_inception")
    torch.save(state, folder / "pt_inception.pth")
    weights.write_safetensors(folder / "pt_inception.safetensors", {n: t.numpy() for n, t in state.items()})
    return dict(folder=folder, pth=folder / "pt_inception.pth", safetensors=folder / "pt_inception.safetensors")


@pytest.fixture(scope="module")
def params(files):
    return ours.load_inception_params(files["safetensors"])


features = jax.jit(ours.inception_features, static_argnames=("resize_input",))


def reference_features(model, images_nchw):
    with torch.no_grad():
        return model(torch.from_numpy(images_nchw))[0].reshape(len(images_nchw), -1).numpy()


def nhwc(images_nchw):
    return jnp.asarray(images_nchw.transpose(0, 2, 3, 1))


def rel_err(got, ref):
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def report(message):
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    print(f"\n[inception] {test}: {message}")


@pytest.mark.parametrize("size", [(299, 299), (320, 384), (128, 128)], ids=["299", "320x384-down", "128-up"])
def test_pool_features_match_pytorch_fid(reference, params, size):
    """At 299 the resize is the identity; 320x384 shrinks (where an antialiased resize differs), 128 grows."""
    images = np.random.default_rng(size[0]).uniform(0, 1, (2, 3, *size)).astype(np.float32)
    ref = reference_features(reference, images)
    got = features(params, nhwc(images))
    assert got.shape == (2, ours.FEATURES) and got.dtype == jnp.float32
    err = rel_err(got, ref)
    report(f"{size[0]}x{size[1]}: max |ours - ref| / max |ref| = {err:.2e} (max |ref| {np.abs(ref).max():.3f}, "
           f"mean ref {ref.mean():.3f})")
    assert err <= FEATURE_TOLERANCE


def test_resize_matches_torch_interpolate():
    """The resize alone, at sizes the network tests do not reach: a 2.5x shrink, odd sizes, one axis kept."""
    functional = torch.nn.functional
    rng = np.random.default_rng(7)
    for in_size, out_size in (((750, 301), (299, 299)), ((37, 299), (299, 101)), ((299, 64), (299, 299))):
        images = rng.uniform(0, 1, (1, 3, *in_size)).astype(np.float32)
        ref = functional.interpolate(torch.from_numpy(images), size=out_size, mode="bilinear",
                                     align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(ours.resize_bilinear(nhwc(images), out_size))
        err = float(np.abs(got - ref).max())
        report(f"{in_size} -> {out_size}: max |ours - torch| = {err:.1e}")
        assert got.shape == ref.shape and err <= 1e-5


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid's sqrtm call
def test_fid_matches_pytorch_fid(reference, params):
    """FID of uniform noise against blocky noise: our features and distance vs pytorch-fid's on its own features."""
    from scipy.linalg import LinAlgWarning

    rng = np.random.default_rng(11)
    noise = rng.uniform(0, 1, (FID_IMAGES, 3, FID_SIZE, FID_SIZE)).astype(np.float32)
    coarse = rng.uniform(0, 1, (FID_IMAGES, 3, FID_SIZE // 4 + 1, FID_SIZE // 4 + 1)).astype(np.float32)
    blocky = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)[:, :, :FID_SIZE, :FID_SIZE]
    reference.resize_input = False  # pytorch-fid's own switch (the parity tests above resize)
    try:
        ref_full = [reference_features(reference, s) for s in (noise, blocky)]
    finally:
        reference.resize_input = True
    our_full = [np.concatenate([np.asarray(features(params, nhwc(s[i:i + FID_BATCH]), resize_input=False))
                                for i in range(0, FID_IMAGES, FID_BATCH)]) for s in (noise, blocky)]
    active = np.flatnonzero((ref_full[0] > 0).all(0) & (ref_full[1] > 0).all(0))
    dims = active[::len(active) // FID_DIMS][:FID_DIMS]
    ref_feats, our_feats = [f[:, dims] for f in ref_full], [f[:, dims] for f in our_full]
    # As pytorch-fid's calculate_activation_statistics: np.mean and np.cov(rowvar=False).
    ref_stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in ref_feats]
    assert all(np.linalg.eigvalsh(sigma)[0] > 0 for _, sigma in ref_stats)  # full rank
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)  # "Matrix is singular": not the well-defined case
        ref_fid = float(reference_fid.calculate_frechet_distance(*ref_stats[0], *ref_stats[1]))
    our_stats = [evaluate.gaussian_statistics(f) for f in our_feats]
    our_fid = evaluate.frechet_distance_from_statistics(*our_stats[0], *our_stats[1])
    # The distance alone, on pytorch-fid's features: ours (symmetric eigh) against its sqrtm.
    distance_err = abs(evaluate.frechet_distance(*ref_feats) - ref_fid) / ref_fid
    # Two halves of one set: how far apart a sample's own noise puts them (the sets must be farther).
    within = evaluate.frechet_distance(ref_feats[0][::2], ref_feats[0][1::2])
    err = abs(our_fid - ref_fid) / ref_fid
    report(f"{FID_IMAGES} vs {FID_IMAGES} images at {FID_SIZE}px, {len(dims)} of {ours.FEATURES} features "
           f"({len(active)} active): FID ours {our_fid:.8f}, pytorch-fid {ref_fid:.8f}, rel diff {err:.2e} (distance "
           f"alone on the same features {distance_err:.2e}; features {rel_err(our_full[0], ref_full[0]):.2e}); "
           f"traces {np.trace(ref_stats[0][1]):.5f}, {np.trace(ref_stats[1][1]):.5f}, FID within one set {within:.5f}")
    assert all(s[0].dtype == np.float64 and s[1].dtype == np.float64 for s in our_stats)
    assert ref_fid > 3 * within  # the sets do differ
    assert err <= FID_TOLERANCE and distance_err <= FID_TOLERANCE


def test_pth_needs_allow_pickle_and_then_loads_the_same(files, params):
    with pytest.raises(weights.WeightLoadError, match=r"pt_inception\.pth.*run code.*allow_pickle.*safetensors"):
        ours.load_inception_params(files["pth"])
    from_pth = ours.load_inception_params(files["pth"], allow_pickle=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), from_pth, params)


@pytest.mark.parametrize("defect, named", [
    ("drop", r"missing 1: Mixed_7c\.branch_pool\.bn\.running_var"),
    ("extra", r"unexpected 1: Mixed_6a\.branch_extra\.conv\.weight"),
    ("reshape", r"mis-shaped 1: Mixed_5b\.branch5x5_2\.conv\.weight \(64, 48, 3, 3\) \(expected \(5, 5, 48, 64\) in Flax layout\)"),
])
def test_bad_tensors_are_named(state, tmp_path, defect, named):
    bad = {n: t.numpy() for n, t in state.items()}
    if defect == "drop":
        del bad["Mixed_7c.branch_pool.bn.running_var"]
    elif defect == "extra":
        bad["Mixed_6a.branch_extra.conv.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    else:
        bad["Mixed_5b.branch5x5_2.conv.weight"] = bad["Mixed_5b.branch5x5_2.conv.weight"][:, :, 1:4, 1:4].copy()
    weights.write_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(weights.WeightLoadError, match=named):
        ours.load_inception_params(tmp_path / "bad.safetensors")


def test_converter_cli_round_trip(files, state, params):
    out = files["folder"] / "converted" / "fid_inception.safetensors"
    with pytest.raises(SystemExit) as refused:  # a pickle is read only with --allow_pickle, as lpips' converter
        ours.main([str(files["pth"]), str(out)])
    assert refused.value.code == 2 and not out.exists()
    ours.main([str(files["pth"]), str(out), "--allow_pickle"])
    stored = weights.read_safetensors(out)
    kept = {n: t.numpy() for n, t in state.items() if not n.startswith("fc.") and not n.endswith("num_batches_tracked")}
    assert sorted(stored) == sorted(kept)
    for name, value in kept.items():
        np.testing.assert_array_equal(stored[name], value, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 ours.load_inception_params(out), params)


def test_weights_fingerprint(files):
    expected = hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()[:16]
    assert ours.weights_fingerprint(files["safetensors"]) == expected
    assert ours.weights_fingerprint(files["pth"]) != expected


def test_bad_inputs_are_refused(params):
    with pytest.raises(ValueError, match="at least 75x75"):
        ours.inception_features(params, jnp.zeros((1, 64, 80, 3)), resize_input=False)
    with pytest.raises(ValueError, match="float images in \\[0, 1\\]; got uint8"):
        ours.inception_features(params, jnp.zeros((1, 299, 299, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"RGB images \(B, H, W, 3\)"):
        ours.inception_features(params, jnp.zeros((1, 3, 299, 299)))
