"""Epsilon and v-prediction teachers: our DDIM and DPM-Solver++ against diffusers' pipeline, and convergence.

The folders are random SD folders (rectflow_jax.random_folder) with SD 1.5's scheduler config; the
reference is diffusers' StableDiffusionPipeline with DDIMScheduler / DPMSolverMultistepScheduler built
from that config with their defaults (tests/sd_reference.py), so a wrong timestep spacing, final step,
parametrisation, guidance rule or change of variables shows as a mismatch.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_reference import diffusers_latents  # noqa: E402

from rectflow_jax import diffusion, random_folder, sampling, teachers  # noqa: E402

PROMPTS = ["a photo of a cat", "a red house by a lake"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folder(request, tmp_path_factory):
    return random_folder.write_random_folder(tmp_path_factory.mktemp(request.param), prediction_type=request.param,
                                             seed=3)


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def solve(teacher, x0, method, num_steps, guidance_scale=7.5, prompts=PROMPTS, negative=""):
    ids = teacher.text.tokenize(prompts)
    run = jax.jit(lambda p, x, i, n: teacher.solve(p, x, i, n, guidance_scale, method=method, num_steps=num_steps,
                                                   guided=sampling.guidance_applies(guidance_scale)))
    return np.asarray(run(teacher.params, x0, ids, teacher.text.negative_ids(negative)))


@pytest.mark.parametrize("method", ["ddim", "dpm_solver++"])
def test_matches_diffusers_pipeline_at_25_steps_with_cfg(folder, method):
    teacher = teachers.load_sd_teacher(folder)
    x0 = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = solve(teacher, x0, method, 25, negative="a dog")
    reference = diffusers_latents(folder, PROMPTS, x0, scheduler=method, num_steps=25, guidance_scale=7.5,
                                  negative_prompt="a dog")
    rel = rel_err(ours, reference)
    print(f"\n[solvers] {teacher.parametrisation} {method}, 25 steps, CFG 7.5: max rel |diff| {rel:.2e}")
    assert rel <= 1e-3
    assert rel_err(solve(teacher, x0, method, 25, negative=""), reference) > 1e-2  # the negative prompt counts


def test_one_step_and_unguided_match_too(folder):
    if "v_prediction" in str(folder):
        pytest.skip("one parametrisation suffices here; both are checked at 25 steps with guidance")
    teacher = teachers.load_sd_teacher(folder)
    x0 = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    for method, steps, scale in (("dpm_solver++", 1, 7.5), ("ddim", 3, 1.0), ("dpm_solver++", 7, 1.0)):
        reference = diffusers_latents(folder, PROMPTS, x0, scheduler=method, num_steps=steps, guidance_scale=scale)
        assert rel_err(solve(teacher, x0, method, steps, scale), reference) <= 1e-3, (method, steps, scale)


def test_solvers_converge_to_one_latent(tmp_path):
    """DDIM, DPM-Solver++ and Heun, each on its own grid from timestep 999 to the data, approach one ODE
    solution as the steps grow, DPM-Solver++ (second order) fastest."""
    folder = random_folder.write_random_folder(tmp_path / "sd", seed=5)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    # Trailing spacing from timestep 999, and a DDIM that ends on the data, as DPM-Solver++ does.
    config.update(timestep_spacing="trailing", set_alpha_to_one=True)
    config_path.write_text(json.dumps(config))
    teacher = teachers.load_sd_teacher(folder)
    x0 = np.random.default_rng(2).standard_normal((1, 8, 8, 4)).astype(np.float32)
    reference = solve(teacher, x0, "heun", 200, guidance_scale=1.0, prompts=PROMPTS[:1])
    errors = {method: [rel_err(solve(teacher, x0, method, n, guidance_scale=1.0, prompts=PROMPTS[:1]), reference)
                       for n in (10, 40, 100)] for method in ("ddim", "dpm_solver++", "heun")}
    print(f"\n[solvers] error against 200 Heun steps at 10, 40, 100 steps: {errors}")
    for method, (coarse, middle, fine) in errors.items():
        assert coarse > middle > fine, method
        assert fine < 2e-2, method
    assert errors["dpm_solver++"][1] < errors["ddim"][1]


def test_unsupported_scheduler_settings_are_named(tmp_path):
    folder = random_folder.write_random_folder(tmp_path / "sd", seed=0)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    base = dict(config)
    for key, value, method, words in (("use_karras_sigmas", True, "dpm_solver++", "use_karras_sigmas=True"),
                                      ("clip_sample", True, "ddim", "clip_sample=True"),
                                      ("prediction_type", "flow_prediction", "ddim", "flow_prediction")):
        path.write_text(json.dumps(dict(base, **{key: value})))
        with pytest.raises((diffusion.ScheduleError, teachers.WeightLoadError, sampling.SamplerError), match=words):
            teachers.load_sd_teacher(folder).time_grid(method, 25)
    del base["clip_sample"]  # DDIMScheduler's default then clips: refused, saying so
    path.write_text(json.dumps(base))
    with pytest.raises(diffusion.ScheduleError, match="does not set clip_sample"):
        teachers.load_sd_teacher(folder).time_grid("ddim", 25)
    # DDIM that lands between its own timesteps (linspace spacing) is no ODE solve: refused.
    path.write_text(json.dumps(dict(base, clip_sample=False, timestep_spacing="linspace")))
    with pytest.raises(sampling.SamplerError, match="lands between its own timesteps"):
        teachers.load_sd_teacher(folder).time_grid("ddim", 25)


def test_grid_is_diffusers_timesteps():
    schedule = diffusion.schedule_for({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
                                      "ddim")
    taus, final = diffusion.timesteps(schedule, 25)
    assert list(taus[:3]) == [961, 921, 881] and taus[-1] == 1
    assert final == pytest.approx(1 - 0.00085)  # alphas_cumprod[0]: set_alpha_to_one false
    dpm = diffusion.schedule_for({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                                 "dpm_solver++")
    taus, final = diffusion.timesteps(dpm, 25)
    assert list(taus[:3]) == [999, 959, 919] and taus[-1] == 40 and final == 1.0
    grid = diffusion.time_grid(dpm, 25)
    assert np.all(np.diff(grid) > 0) and grid[-1] == 1.0 and 0.0 < grid[0] < 0.1


def test_change_of_variables_round_trips():
    """y = x / (a + s) at r = a / (a + s): an exact interpolant, back and forth."""
    rng = np.random.default_rng(0)
    data, eps = rng.standard_normal((2, 3, 4)).astype(np.float32)
    alpha_bar = np.float32(0.3)
    a, s = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    x = a * data + s * eps
    r = a / (a + s)
    y = np.asarray(diffusion.to_rf(x, np.float32(r)))
    np.testing.assert_allclose(y, r * data + (1 - r) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(diffusion.from_rf(y, np.float32(r))), x, rtol=1e-5, atol=1e-6)
    # The exact epsilon gives the exact velocity data - eps.
    v = diffusion.velocity_from_prediction("epsilon", eps, y, np.float32(r))
    np.testing.assert_allclose(np.asarray(v), data - eps, rtol=1e-4, atol=1e-4)
    v_target = a * eps - s * data  # diffusers' v-prediction target
    v = diffusion.velocity_from_prediction("v_prediction", v_target, y, np.float32(r))
    np.testing.assert_allclose(np.asarray(v), data - eps, rtol=1e-4, atol=1e-4)
