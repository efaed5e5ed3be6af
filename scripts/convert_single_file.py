#!/usr/bin/env python3
"""Converts a single-file Stable Diffusion 1.x checkpoint (what AUTOMATIC1111 and Civitai users have: one
.safetensors or .ckpt holding the UNet, VAE and CLIP text encoder in the original LDM layout) into the diffusers
folder that tomeserve serves, with safetensors weights. Offline: nothing is downloaded, ever.

usage: convert_single_file.py CHECKPOINT OUT_DIR --config-dir DIR [--dtype fp32|fp16|bf16] [--variant NAME]

  .venv/bin/python scripts/convert_single_file.py ~/Downloads/model.safetensors /models/mymodel \\
      --config-dir /models/sd15
  build/bin/tomeserve --model mymodel=/models/mymodel

A single file has weights but no configs and no tokenizer, so --config-dir names a local diffusers SD 1.x folder
(a copy of stable-diffusion-v1-5/stable-diffusion-v1-5, or the folder a fine-tune came from) whose model_index.json,
unet/, vae/, text_encoder/ configs, tokenizer/ and scheduler/ describe the checkpoint; its weights are not read.
The conversion is diffusers' StableDiffusionPipeline.from_single_file(CHECKPOINT, config=DIR,
local_files_only=True) with HF_HUB_OFFLINE=1, then save_pretrained(OUT_DIR, safe_serialization=True). The
tokenizer folder is copied from DIR as it is (transformers 5 would rewrite it without the vocab.json and merges.txt
that tomeserve reads). Safety checker and feature extractor are left out (tomeserve uses neither). A .ckpt is read
with torch's weights-only unpickler. Checkpoints holding EMA and non-EMA weights give the non-EMA ones (diffusers'
default).

Refused, with one line saying why (exit 2): a CHECKPOINT that is missing or is a folder, a non-empty OUT_DIR, a
DIR that is not a diffusers folder, a checkpoint that is not SD 1.x (SD 2.x, SDXL, inpainting, ControlNet, ...) or
lacks a component (some files ship without their VAE), and a checkpoint that does not fill every weight of DIR's
architecture (diffusers would silently keep random values for those). OUT_DIR is written under a temporary name
next to it and renamed at the end, so a failed run leaves nothing behind.
"""
import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Before diffusers and huggingface_hub are imported (they read it once): every hub call then fails instead of
# reaching the network.
os.environ["HF_HUB_OFFLINE"] = "1"

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Prefixes of the three components in an SD 1.x single file (the LDM / A1111 layout).
COMPONENT_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                      "text_encoder": "cond_stage_model.transformer."}


class Refused(Exception):
    """A reason to stop before writing anything, said in one line."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="the single .safetensors or .ckpt file")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the diffusers folder to write (absent or empty)")
    p.add_argument("--config-dir", type=Path, required=True, metavar="DIR",
                   help="a local diffusers SD 1.x folder whose configs, tokenizer and scheduler describe CHECKPOINT")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the checkpoint's own, e.g. fp16 for a pruned fp16 "
                        "file)")
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="write diffusers variant file names (<stem>.NAME.safetensors, as Hugging Face's fp16 files); "
                        "tomeserve loads them when they are a component's only weights")
    return p.parse_args(argv)


def check_paths(args):
    if not args.checkpoint.exists():
        raise Refused(f"{args.checkpoint}: no such file")
    if args.checkpoint.is_dir():
        hint = (" (it has model_index.json: it is a diffusers folder already, serve it as it is)"
                if (args.checkpoint / "model_index.json").is_file() else "")
        raise Refused(f"{args.checkpoint} is a folder, not a single-file checkpoint{hint}")
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        raise Refused(f"{args.out_dir} exists and is not an empty folder; pick a new OUT_DIR")
    needed = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"]
    missing = [n for n in needed if not (args.config_dir / n).is_file()]
    if missing:
        raise Refused(f"--config-dir {args.config_dir} is not a diffusers SD 1.x folder: no {', '.join(missing)}")


def check_checkpoint(checkpoint, path):
    """The file must be an SD 1.x checkpoint with all three components."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    absent = [name for name, prefix in COMPONENT_PREFIXES.items() if not any(k.startswith(prefix) for k in checkpoint)]
    if absent:
        raise Refused(f"{path} has no {' and no '.join(absent)} weights (no keys starting with "
                      f"{', '.join(COMPONENT_PREFIXES[a] for a in absent)}): not a full SD 1.x checkpoint "
                      "(a LoRA, an embedding, or a file that ships without its VAE?)")
    kind = infer_diffusers_model_type(checkpoint)
    if kind != "v1":
        raise Refused(f"{path}: diffusers detects a {kind!r} checkpoint (not SD 1.x); tomeserve serves SD 1.x only")


def checkpoint_dtype(checkpoint):
    """The most common floating dtype of the UNet's tensors: what the file was saved in."""
    counts = Counter(str(v.dtype).removeprefix("torch.") for k, v in checkpoint.items()
                     if k.startswith(COMPONENT_PREFIXES["unet"]) and v.is_floating_point())
    return counts.most_common(1)[0][0]


def check_complete(pipe, checkpoint, path):
    """Every weight of the three models must come from the checkpoint: diffusers' loader leaves the ones it does not
    find at their initial values without an error, which would be a silently broken model."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    def plain(keys):  # transformers >= 5.6 flattened CLIPTextModel: no "text_model." level in its state dict
        return {k.removeprefix("text_model.") for k in keys}

    found = {"unet": set(convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))),
             "vae": set(convert_ldm_vae_checkpoint(checkpoint, dict(pipe.vae.config))),
             "text_encoder": plain(convert_ldm_clip_checkpoint(checkpoint))}
    for name, keys in found.items():
        wanted = set(getattr(pipe, name).state_dict())
        if name == "text_encoder":
            wanted = plain(wanted)
        missing = sorted(wanted - keys)
        if missing:
            raise Refused(f"{path} does not fill {len(missing)} of the {len(wanted)} {name} weights of "
                          f"--config-dir's architecture (e.g. {', '.join(missing[:3])}): checkpoint and config "
                          "are not the same model")


def convert(args):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    checkpoint = load_single_file_checkpoint(str(args.checkpoint), local_files_only=True)
    check_checkpoint(checkpoint, args.checkpoint)
    dtype = DTYPES.get(args.dtype) or checkpoint_dtype(checkpoint)
    # config= a local folder: diffusers reads the component configs from it and never looks for them on the hub
    # (without it, or with local_files_only and no local config, it would download them).
    pipe = StableDiffusionPipeline.from_single_file(
        str(args.checkpoint), config=str(args.config_dir), local_files_only=True, torch_dtype=getattr(torch, dtype),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    check_complete(pipe, checkpoint, args.checkpoint)
    del checkpoint

    out = args.out_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True, variant=args.variant)
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
        shutil.copytree(args.config_dir / "tokenizer", tmp / "tokenizer")
        if out.exists():
            out.rmdir()  # empty, checked before
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, dtype


def main(argv=None):
    args = parse_args(argv)
    try:
        check_paths(args)
        out, dtype = convert(args)
    except Refused as e:
        print(f"convert_single_file: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**30
    print(f"wrote {out} ({dtype}, {size:.2f} GiB of safetensors); serve it with: "
          f"build/bin/tomeserve --model {out.name}={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
