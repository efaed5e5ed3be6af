"""scripts/convert_single_file.py: an SD 1.x single-file checkpoint (the LDM / A1111 layout) back to a diffusers folder.

The checkpoint is made here from the tiny random-weight model by renaming its diffusers keys to the original layout
(`to_ldm` below, written against the layout diffusers' own single-file loader reads), and --config-dir is a copy of
the tiny model WITHOUT its weights, so every weight in the output must have come through the checkpoint. Weights
must round-trip bit for bit (a rename and, for the VAE's mid attention, a reshape: no arithmetic). Every
conversion runs with the socket layer replaced by one that records and refuses any connection attempt, and with
HF_HUB_OFFLINE unset in the environment, so the script's own offline settings are what is tested."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, binary

SCRIPT = REPO / "scripts" / "convert_single_file.py"
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

# ---- diffusers folder -> single file (the inverse of what diffusers' single-file loader does) ----

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def rename(state, prefixes, reshape=lambda key, value: value):
    """prefixes: diffusers prefix -> (original prefix, renames of the name right after it). Longest prefix wins."""
    out = {}
    for key, value in state.items():
        match = max((p for p in prefixes if key.startswith(p)), key=len, default="")
        new_prefix, inner = prefixes.get(match, ("", {}))
        rest = key[len(match):]
        for old, new in inner.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[new_prefix + rest] = reshape(new_prefix + rest, value)
    return out


def unet_prefixes(config):
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    p = {"time_embedding.linear_1.": ("time_embed.0.", {}), "time_embedding.linear_2.": ("time_embed.2.", {}),
         "conv_in.": ("input_blocks.0.0.", {}), "conv_norm_out.": ("out.0.", {}), "conv_out.": ("out.2.", {}),
         "mid_block.resnets.0.": ("middle_block.0.", UNET_RESNET), "mid_block.attentions.0.": ("middle_block.1.", {}),
         "mid_block.resnets.1.": ("middle_block.2.", UNET_RESNET)}
    block = 1  # the original numbers input_blocks and output_blocks sequentially over every level
    for i in range(levels):
        for j in range(per_block):
            p[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{block}.0.", UNET_RESNET)
            p[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{block}.1.", {})
            block += 1
        if i < levels - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{block}.0.op.", {})
            block += 1
    block = 0
    for i in range(levels):
        for j in range(per_block + 1):
            p[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{block}.0.", UNET_RESNET)
            p[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{block}.1.", {})
            block += 1
        if i < levels - 1:  # the upsampler sits in the level's last block, after its attention if it has one
            has_attention = config["up_block_types"][i].startswith("CrossAttn")
            p[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{block - 1}.{2 if has_attention else 1}.", {})
    return p


def vae_prefixes(config):
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    p = {}
    for part in ("encoder", "decoder"):
        p[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        p[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION)
        for k in range(2):
            p[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", VAE_RESNET)
    for i in range(levels):
        for j in range(per_block):
            p[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        p[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
        for j in range(per_block + 1):  # decoder levels are numbered from the bottom in the original
            p[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{levels - 1 - i}.block.{j}.", VAE_RESNET)
        p[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{levels - 1 - i}.upsample.", {})
    return p


def vae_reshape(key, value):
    # The original VAE's mid-attention projections are 1x1 convolutions, diffusers' are linear layers.
    if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
        return value.reshape(*value.shape, 1, 1)
    return value


def to_ldm(model_dir):
    config = {c: json.loads((model_dir / c / "config.json").read_text()) for c in ("unet", "vae")}
    weights = {c: load_file(model_dir / c / f"{stem}.safetensors") for c, stem in WEIGHTS.items()}
    unet = rename(weights["unet"], unet_prefixes(config["unet"]))
    vae = rename(weights["vae"], vae_prefixes(config["vae"]), vae_reshape)
    state = {"model.diffusion_model." + k: v for k, v in unet.items()}
    state.update({"first_stage_model." + k: v for k, v in vae.items()})
    # SD 1.x files hold transformers' CLIPTextModel as it was: under text_model.
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in weights["text_encoder"].items()})
    return {k: v.contiguous() for k, v in state.items()}


# ---- fixtures ----

NO_NETWORK = '''
import os, socket
def _refuse(*args, **kwargs):
    with open(os.environ["CONVERT_TEST_NET_LOG"], "a") as f:
        f.write(repr(args[1:2] or args[:1]) + "\\n")
    raise OSError("network access refused by the test")
socket.socket.connect = socket.socket.connect_ex = _refuse
socket.getaddrinfo = socket.create_connection = _refuse
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(NO_NETWORK)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return Path(tiny_model)


@pytest.fixture(scope="module")
def config_dir(tiny, work):
    """The tiny model's configs, tokenizer and scheduler, none of its weights."""
    out = work / "config-only"
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index*.json", ".stamp"))
    return out


@pytest.fixture(scope="module")
def single_file(tiny, work):
    path = work / "tiny-single.safetensors"
    save_file(to_ldm(tiny), path)
    return path


def convert(work, *args):
    log = work / f"net-{os.urandom(4).hex()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(PYTHONPATH=str(work / "guard"), CONVERT_TEST_NET_LOG=str(log), HF_HOME=str(work / "hf-home"),
               PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env)
    attempts = log.read_text() if log.exists() else ""
    assert not attempts, f"network access attempted: {attempts}"
    return run


def model_config(model_dir, component):
    """A component's config without what records the writing library's version or dtype."""
    config = json.loads((model_dir / component / "config.json").read_text())
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}


def assert_refused(run, needle):
    assert run.returncode == 2, (run.returncode, run.stderr[-800:])
    lines = run.stderr.strip().splitlines()
    assert lines and needle in lines[-1], run.stderr[-800:]


# ---- tests ----

def test_the_network_guard_refuses(work):
    # The guard the conversions run under must itself catch an attempt, or "no attempt seen" proves nothing.
    log = work / "guard-check.log"
    env = dict(os.environ, PYTHONPATH=str(work / "guard"), CONVERT_TEST_NET_LOG=str(log))
    run = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "refused by the test" in run.stderr
    assert log.read_text()


def test_round_trip_is_bit_exact(tiny, config_dir, single_file, work):
    out = work / "out-fp32"
    run = convert(work, single_file, out, "--config-dir", config_dir)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {out}" in run.stdout and "float32" in run.stdout
    for component, stem in WEIGHTS.items():
        want = load_file(tiny / component / f"{stem}.safetensors")
        got = load_file(out / component / f"{stem}.safetensors")
        assert sorted(got) == sorted(want), component
        for key in want:
            assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), f"{component} {key}"
        assert model_config(out, component) == model_config(tiny, component)
    drop = lambda d: {k: v for k, v in d.items() if k != "_diffusers_version"}  # noqa: E731
    scheduler = "scheduler/scheduler_config.json"
    assert drop(json.loads((out / scheduler).read_text())) == drop(json.loads((tiny / scheduler).read_text()))
    for f in (tiny / "tokenizer").iterdir():  # copied as it is: tomeserve reads vocab.json and merges.txt
        assert (out / "tokenizer" / f.name).read_bytes() == f.read_bytes(), f.name
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["safety_checker"] == [None, None]
    assert not list(work.glob(".out-fp32.*")), "temporary folder left behind"


def test_fp16_file_keeps_fp16_and_writes_variant_names(tiny, config_dir, single_file, work):
    half = work / "tiny-single-fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(single_file).items()}, half)
    out = work / "out-fp16"
    run = convert(work, half, out, "--config-dir", config_dir, "--variant", "fp16")
    assert run.returncode == 0, run.stderr[-2000:]
    for component, stem in WEIGHTS.items():
        assert not (out / component / f"{stem}.safetensors").exists()
        want = load_file(tiny / component / f"{stem}.safetensors")
        got = load_file(out / component / f"{stem}.fp16.safetensors")
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == torch.float16 and torch.equal(got[key], want[key].half()), f"{component} {key}"


def test_dtype_flag_casts(config_dir, single_file, work):
    out = work / "out-bf16"
    run = convert(work, single_file, out, "--config-dir", config_dir, "--dtype", "bf16")
    assert run.returncode == 0, run.stderr[-2000:]
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in unet.values()} == {torch.bfloat16}


def test_converted_folder_generates_the_same_image(tiny, config_dir, single_file, work, tmp_path):
    gen = binary("tomeserve-gen")
    out = work / "out-served"
    assert convert(work, single_file, out, "--config-dir", config_dir).returncode == 0
    images = []
    for model in (tiny, out):
        png = tmp_path / f"{model.name}.png"
        run = subprocess.run([str(gen), "generate", "--model", str(model), "--prompt", "a red cube", "--steps", "3",
                              "--seed", "5", "-o", str(png)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        images.append(np.asarray(Image.open(png)))
    assert np.array_equal(images[0], images[1])


@pytest.mark.parametrize("drop, needle", [
    ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "does not fill 1 of the"),
    ("first_stage_model.", "has no vae weights"),
])
def test_incomplete_checkpoint_is_refused(config_dir, single_file, work, drop, needle):
    path = work / f"broken-{abs(hash(drop))}.safetensors"
    save_file({k: v for k, v in load_file(single_file).items() if not k.startswith(drop)}, path)
    out = work / f"out-broken-{abs(hash(drop))}"
    assert_refused(convert(work, path, out, "--config-dir", config_dir), needle)
    assert not out.exists()


def test_other_architectures_are_refused(config_dir, single_file, work):
    # diffusers' own detection key for SDXL's second text encoder
    state = load_file(single_file)
    state["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.zeros(4)
    path = work / "looks-like-sdxl.safetensors"
    save_file(state, path)
    assert_refused(convert(work, path, work / "out-xl", "--config-dir", config_dir), "detects a 'xl_base' checkpoint")


def test_bad_paths_are_refused_before_anything_loads(tiny, config_dir, single_file, work):
    assert_refused(convert(work, work / "nope.safetensors", work / "o1", "--config-dir", config_dir), "no such file")
    assert_refused(convert(work, tiny, work / "o2", "--config-dir", config_dir), "a diffusers folder already")
    taken = work / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert_refused(convert(work, single_file, taken, "--config-dir", config_dir), "not an empty folder")
    assert (taken / "keep.txt").read_text() == "x"
    assert_refused(convert(work, single_file, work / "o3", "--config-dir", work), "no model_index.json")
    run = convert(work, single_file, work / "o4")
    assert run.returncode == 2 and "--config-dir" in run.stderr
    assert not any((work / o).exists() for o in ("o1", "o2", "o3", "o4"))
