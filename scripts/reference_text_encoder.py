#!/usr/bin/env python3
"""Writes the transformers reference output of an SD 1.x text encoder, the ground truth for the C++ CLIP tests.

    reference_text_encoder.py --model DIR --out FILE.safetensors [--prompts-file F] [--device cpu]

DIR is a diffusers-format SD 1.x folder (tokenizer/ and text_encoder/ inside; e.g. one written by
make_tiny_model.py). Prompts are tokenized exactly as diffusers' StableDiffusionPipeline.encode_prompt does
(padding="max_length", truncation=True, max_length=77) and run through CLIPTextModel in fp32, eval mode, under
torch.no_grad, without an attention mask (SD 1.x text encoders have no use_attention_mask; diffusers passes None).

Output tensors (the C++ safetensors reader takes F32/F16/BF16 only, so ids are stored as exactly representable F32):
    input_ids          F32 [B, 77]
    last_hidden_state  F32 [B, 77, hidden]
Metadata (all strings): prompts (JSON list, in batch order), attn_implementation, model, max_length,
torch_version, transformers_version.

--prompts-file: a .json file holding a list of strings, or a text file with one prompt per line (an empty line is
an empty prompt).
"""

import argparse
import json
import sys
from pathlib import Path

MAX_LENGTH = 77

DEFAULT_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "A Cozy Cabin in the Snowy Mountains, oil painting, 4k, (highly detailed:1.2) -- by Greg Rutkowski!!!",
    "café naïve façade, 日本語のテキスト, emoji 🤖🎨, it's we'll they're   multiple    spaces\tand\ttabs",
    "portrait",
    # Well over 77 tokens: exercises truncation (BOS + 75 tokens + EOS).
    "an extremely long prompt describing a sprawling futuristic city at dusk with neon lights reflecting on wet "
    "streets, flying cars weaving between towering skyscrapers, crowds of people with umbrellas, holographic "
    "advertisements in many languages, steam rising from street vendors, a distant mountain range under a purple "
    "sky, cinematic lighting, volumetric fog, ultra detailed, sharp focus, trending on artstation, award winning "
    "photograph, 35mm lens, shallow depth of field, golden hour, dramatic clouds, reflections, bokeh",
]


def read_prompts(path):
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = text.splitlines()
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def encode(model_dir, prompts, device="cpu"):
    """Returns (input_ids int64 [B,77], last_hidden_state float32 [B,77,H], attn_implementation)."""
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), dtype=torch.float32)
    text_encoder = text_encoder.to(device).eval()
    tokens = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids
    with torch.no_grad():
        hidden = text_encoder(input_ids.to(device), attention_mask=None)[0]
    return input_ids, hidden.float().cpu().contiguous(), str(text_encoder.config._attn_implementation)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write transformers' CLIP text encoder output as a reference.")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x folder (tokenizer/, text_encoder/)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--prompts-file", type=Path, help=".json list of strings, or one prompt per line")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad arguments
    for sub in ("tokenizer", "text_encoder"):
        if not (args.model / sub).is_dir():
            parser.error(f"{args.model} has no {sub}/ folder")
    if args.prompts_file is not None and not args.prompts_file.is_file():
        parser.error(f"--prompts-file {args.prompts_file} does not exist")
    try:
        prompts = read_prompts(args.prompts_file) if args.prompts_file else list(DEFAULT_PROMPTS)
    except (ValueError, UnicodeDecodeError) as e:
        parser.error(str(e))

    import torch
    import transformers
    from safetensors.torch import save_file

    input_ids, hidden, attn_impl = encode(args.model, prompts, args.device)
    if int(input_ids.max()) >= 2**24:
        sys.exit("token ids do not fit exactly in float32")
    metadata = {
        "prompts": json.dumps(prompts, ensure_ascii=False),
        "attn_implementation": attn_impl,
        "model": str(args.model.resolve()),
        "max_length": str(MAX_LENGTH),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": input_ids.to(torch.float32).contiguous(), "last_hidden_state": hidden},
        str(args.out),
        metadata=metadata,
    )
    print(f"wrote {args.out}: input_ids {list(input_ids.shape)}, last_hidden_state {list(hidden.shape)}, "
          f"{len(prompts)} prompts, attn_implementation={attn_impl}")


if __name__ == "__main__":
    main()
