#!/usr/bin/env python3
"""Writes diffusers' scheduler trajectories, the ground truth for the C++ schedulers (tests/scheduler_test.cpp).

    reference_schedulers.py --model DIR --out FILE.safetensors [--device cpu|cuda]

DIR is a diffusers SD 1.x folder; only scheduler/scheduler_config.json is read. Every case builds its scheduler
the way StableDiffusionPipeline users switch schedulers, `XScheduler.from_config(config, **kwargs)` on the model's
config (plus the case's overrides, applied as if they were written in the file), calls set_timesteps(steps) and
runs the pipeline's loop with random model outputs:

    sample = sample0 * init_noise_sigma
    for i, t in enumerate(timesteps):
        scaled_input[i] = scale_model_input(sample, t)
        sample = prev_sample[i] = step(model_output[i], t, sample, [generator]).prev_sample

Euler ancestral gets a CPU torch.Generator seeded with the case's noise_seed, as the pipeline passes one per
sample. fp16 cases run in float16 (sample0 and the model outputs are rounded to float16 first). With --device
cuda the tensors live on the GPU (random values are still drawn on the CPU), as in a GPU pipeline.

Output (all F32; fp16 values are stored exactly; timesteps are integers or float32 values, exact in F32):
    sample0                     [1, 4, 8, 8]
    CASE/timesteps              [calls]
    CASE/init_noise_sigma       [1]
    CASE/model_output/I, CASE/scaled_input/I, CASE/prev_sample/I   [1, 4, 8, 8]
CASE is "NAME/STEPS". Metadata: "cases" (JSON list of {key, kind, steps, overrides, dtype, noise_seed}),
"config" (the scheduler_config.json used), device, torch_version, diffusers_version.
"""

import argparse
import json
import sys
from pathlib import Path

SHAPE = (1, 4, 8, 8)
KINDS = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
BASE_STEPS = (1, 2, 20, 50)
SPACING_STEPS = (1, 2, 7, 20)

# (name, kind, overrides, steps, dtype). The base cases use the model's config unchanged; the variants cover the
# other config values the C++ side supports.
VARIANTS = (
    *[(f"{k}_{s}", k, {"timestep_spacing": s}, SPACING_STEPS, "fp32")
      for k in KINDS if k != "dpmpp_2m_karras" for s in ("linspace", "trailing")],
    *[(f"{k}_v", k, {"prediction_type": "v_prediction"}, (2, 20), "fp32") for k in KINDS],
    *[(f"{k}_fp16", k, {}, (2, 20), "fp16") for k in KINDS],
    ("ddim_alpha_one_clip", "ddim", {"set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.5},
     (2, 20), "fp32"),
    ("ddim_linear", "ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, (20,), "fp32"),
    ("pndm_cos", "pndm", {"beta_schedule": "squaredcos_cap_v2"}, (20,), "fp32"),
    ("euler_karras", "euler", {"use_karras_sigmas": True}, (1, 2, 7, 20), "fp32"),
    ("euler_sigma_min", "euler", {"final_sigmas_type": "sigma_min"}, (7,), "fp32"),
    ("euler_a_linear", "euler_a", {"beta_schedule": "linear"}, (20,), "fp32"),
    ("dpmpp_2m_heun_sigma_min", "dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min"},
     (2, 7, 20), "fp32"),
    ("dpmpp_2m_no_lower_order_final", "dpmpp_2m", {"lower_order_final": False}, (7,), "fp32"),
    ("dpmpp_2m_euler_at_final", "dpmpp_2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, (20,),
     "fp32"),
    ("dpmpp_2m_cos_clipped", "dpmpp_2m",
     {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "linspace"}, (20,),
     "fp32"),
    ("dpmpp_2m_karras_trained_betas", "dpmpp_2m_karras", {"trained_betas": "LINEAR_1000"}, (20,), "fp32"),
)


def make_scheduler(kind, config):
    import diffusers

    if kind == "pndm":
        return diffusers.PNDMScheduler.from_config(config)
    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if kind == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if kind == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    # "DPM++ 2M": the kind fixes the algorithm and order, whatever a DPM config file says.
    return diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=(kind == "dpmpp_2m_karras"))


def run_case(key, kind, config, steps, dtype, sample0, model_seed, noise_seed, out, device):
    import torch

    scheduler = make_scheduler(kind, config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps.cpu()
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model_gen = torch.Generator("cpu").manual_seed(model_seed)
    noise_gen = torch.Generator("cpu").manual_seed(noise_seed)
    # As prepare_latents: a 0-dim tensor for the Euler schedulers, the float 1.0 otherwise.
    sample = sample0.to(device, torch_dtype) * scheduler.init_noise_sigma
    out[f"{key}/timesteps"] = timesteps.to(torch.float32)
    if not torch.equal(out[f"{key}/timesteps"].to(timesteps.dtype), timesteps):
        raise RuntimeError(f"{key}: timesteps are not exact in float32")
    out[f"{key}/init_noise_sigma"] = torch.tensor([float(scheduler.init_noise_sigma)], dtype=torch.float32)
    for i, t in enumerate(scheduler.timesteps):
        model_output = torch.randn(SHAPE, generator=model_gen).to(device, torch_dtype)
        scaled = scheduler.scale_model_input(sample, t)
        kwargs = {"generator": noise_gen} if kind == "euler_a" else {}
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
        if sample.dtype != torch_dtype or scaled.dtype != torch_dtype:
            raise RuntimeError(f"{key}: unexpected dtype {sample.dtype} / {scaled.dtype}")
        out[f"{key}/model_output/{i}"] = model_output.float().cpu().clone()
        out[f"{key}/scaled_input/{i}"] = scaled.float().cpu().clone()
        out[f"{key}/prev_sample/{i}"] = sample.float().cpu().clone()
    return len(timesteps)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write diffusers scheduler trajectories as a reference.")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x folder (scheduler/ inside)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--device", default="cpu", help="torch device of the tensors (default: cpu)")
    args = parser.parse_args(argv)
    config_path = args.model / "scheduler" / "scheduler_config.json"
    if not config_path.is_file():
        parser.error(f"{config_path} does not exist")
    file_config = json.loads(config_path.read_text())

    import diffusers
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    sample0 = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0))
    out = {"sample0": sample0}
    cases = []
    plan = [(k, k, {}, BASE_STEPS, "fp32") for k in KINDS] + list(VARIANTS)
    for name, kind, overrides, step_list, dtype in plan:
        for steps in step_list:
            key = f"{name}/{steps}"
            index = len(cases)
            config = dict(file_config)
            config.update(overrides)
            if config.get("trained_betas") == "LINEAR_1000":  # a trained_betas list, written out in full
                config["trained_betas"] = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64).tolist()
                overrides = {**overrides, "trained_betas": config["trained_betas"]}
            case = dict(key=key, kind=kind, steps=steps, overrides=overrides, dtype=dtype, noise_seed=5000 + index)
            calls = run_case(key, kind, config, steps, dtype, sample0, 1000 + index, case["noise_seed"], out,
                             args.device)
            case["calls"] = calls
            cases.append(case)
    metadata = {
        "cases": json.dumps(cases),
        "config": json.dumps(file_config),
        "device": args.device,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(args.out), metadata=metadata)
    print(f"wrote {args.out}: {len(cases)} cases, {len(out)} tensors")


if __name__ == "__main__":
    sys.exit(main())
