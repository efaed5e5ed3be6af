#!/usr/bin/env python3
"""Creates test data on demand and reuses it while the scripts that made it are unchanged.

  ensure_testdata.py model --preset tiny|sd15|tiny-xl|sdxl --out DIR [--dtype fp32|fp16]
  ensure_testdata.py text-encoder-ref --model DIR --out FILE.safetensors [--tower 1|2|xl]

Each output gets a stamp (a hash of the generating scripts and arguments); a matching stamp means the data is
current and nothing runs. Used as ctest fixtures so that a plain `ctest` works from a fresh build tree.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")


def digest(paths, extra):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    h.update(repr(extra).encode())
    return h.hexdigest()


def ensure(stamp_path, want, command):
    if os.path.exists(stamp_path) and open(stamp_path).read().strip() == want:
        print(f"up to date: {stamp_path}")
        return
    t0 = time.time()
    subprocess.run(command, check=True)
    with open(stamp_path, "w") as f:
        f.write(want + "\n")
    print(f"generated in {time.time() - t0:.1f}s: {' '.join(command)}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("--preset", choices=["tiny", "sd15", "tiny-xl", "sdxl"], required=True)
    m.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--legacy-text-encoder-keys", action="store_true",
                   help="write the text encoder with SD 1.x's text_model.* keys and int64 position_ids")
    r = sub.add_parser("text-encoder-ref")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tower", choices=["1", "2", "xl"], default="1",
                   help="2: SDXL's tokenizer_2 + text_encoder_2; xl: SDXL's encode_prompt")
    a = p.parse_args()

    if a.what == "model":
        scripts = [os.path.join(SCRIPTS, "make_tiny_model.py"), os.path.join(SCRIPTS, "clip_vocab.py")]
        want = digest(scripts, (a.preset, a.seed, a.legacy_text_encoder_keys) + ((a.dtype,) if a.dtype != "fp32" else ()))
        os.makedirs(a.out, exist_ok=True)
        command = [sys.executable, scripts[0], a.out, "--preset", a.preset, "--seed", str(a.seed), "--dtype", a.dtype]
        if a.legacy_text_encoder_keys:
            command.append("--legacy-text-encoder-keys")
        ensure(os.path.join(a.out, ".stamp"), want, command)
    else:
        script = os.path.join(SCRIPTS, "reference_text_encoder.py")
        model_stamp = open(os.path.join(a.model, ".stamp")).read().strip()
        want = digest([script], (model_stamp, a.tower))
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        ensure(a.out + ".stamp", want, [sys.executable, script, "--model", a.model, "--out", a.out, "--tower", a.tower])


if __name__ == "__main__":
    main()
