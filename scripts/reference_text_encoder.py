#!/usr/bin/env python3
"""Writes the transformers reference output of an SD 1.x text encoder, the ground truth for the C++ CLIP tests.

    reference_text_encoder.py --model DIR --out FILE.safetensors [--prompts-file F] [--device cpu] [--tower 1|2|xl]

DIR is a diffusers-format SD 1.x folder (tokenizer/ and text_encoder/ inside; e.g. one written by
make_tiny_model.py). Prompts are tokenized exactly as diffusers' StableDiffusionPipeline.encode_prompt does
(padding="max_length", truncation=True, max_length=77) and run through CLIPTextModel in fp32, eval mode, under
torch.no_grad, without an attention mask (SD 1.x text encoders have no use_attention_mask; diffusers passes None).

Output tensors (the C++ safetensors reader takes F32/F16/BF16 only, so ids are stored as exactly representable F32):
    input_ids                 F32 [B, 77]
    last_hidden_state         F32 [B, 77, hidden]
    penultimate_hidden_state  F32 [B, 77, hidden]   hidden_states[-2] (what SDXL conditions on)
    pooled                    F32 [B, hidden or projection_dim]   pooler_output; text_embeds for --tower 2
--tower 2 reads SDXL's tokenizer_2/ and text_encoder_2/ (CLIPTextModelWithProjection) instead. --tower xl stores
StableDiffusionXLPipeline.encode_prompt's output instead: prompt_embeds, pooled_prompt_embeds and the
negatives without a negative prompt (input_ids: tokenizer_2's).
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


def encode(model_dir, prompts, device="cpu", tower="1"):
    """Returns (input_ids int64 [B,77], {name: float32 tensor}, attn_implementation). Tower "1": tokenizer/ +
    text_encoder/ (CLIPTextModel); "2": SDXL's tokenizer_2/ + text_encoder_2/ (CLIPTextModelWithProjection)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_dir = Path(model_dir)
    suffix = "" if tower == "1" else "_2"
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / f"tokenizer{suffix}"))
    cls = CLIPTextModel if tower == "1" else CLIPTextModelWithProjection
    text_encoder = cls.from_pretrained(str(model_dir / f"text_encoder{suffix}"), dtype=torch.float32)
    text_encoder = text_encoder.to(device).eval()
    tokens = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids
    with torch.no_grad():
        out = text_encoder(input_ids.to(device), attention_mask=None, output_hidden_states=True)
    # What SD 1.x reads (last_hidden_state) and what SDXL reads (hidden_states[-2]; the pooled output,
    # text_embeds with the projection).
    pooled = out.pooler_output if tower == "1" else out.text_embeds
    tensors = {"last_hidden_state": out.last_hidden_state, "penultimate_hidden_state": out.hidden_states[-2],
               "pooled": pooled}
    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
    return input_ids, tensors, str(text_encoder.config._attn_implementation)


def encode_sdxl(model_dir, prompts, device="cpu"):
    """StableDiffusionXLPipeline.encode_prompt with classifier-free guidance and no negative prompt: returns
    (input_ids of tokenizer_2, {prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
    negative_pooled_prompt_embeds}) — the negatives are force_zeros_for_empty_prompt's zeros."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32).to(device)
    ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
               "negative_pooled_prompt_embeds": negative_pooled}
    return ids, {k: v.float().cpu().contiguous() for k, v in tensors.items()}, "sdpa"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write transformers' CLIP text encoder output as a reference.")
    parser.add_argument("--model", type=Path, required=True, help="diffusers SD 1.x folder (tokenizer/, text_encoder/)")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    parser.add_argument("--prompts-file", type=Path, help=".json list of strings, or one prompt per line")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--tower", choices=("1", "2", "xl"), default="1",
                        help="1: tokenizer/ + text_encoder/; 2: SDXL's tokenizer_2/ + text_encoder_2/; xl: SDXL's "
                             "pipeline encode_prompt (both towers)")
    args = parser.parse_args(argv)  # argparse exits with status 2 on bad arguments
    suffix = "_2" if args.tower in ("2", "xl") else ""
    for sub in (f"tokenizer{suffix}", f"text_encoder{suffix}"):
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

    if args.tower == "xl":
        input_ids, tensors, attn_impl = encode_sdxl(args.model, prompts, args.device)
    else:
        input_ids, tensors, attn_impl = encode(args.model, prompts, args.device, args.tower)
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
    save_file({"input_ids": input_ids.to(torch.float32).contiguous(), **tensors}, str(args.out), metadata=metadata)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    print(f"wrote {args.out}: input_ids {list(input_ids.shape)}, {shapes}, {len(prompts)} prompts, "
          f"attn_implementation={attn_impl}")


if __name__ == "__main__":
    main()
