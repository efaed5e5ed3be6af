"""Token-id parity of the C++ ClipTokenizer with the pinned transformers CLIPTokenizer.

Every line of tests/tokenizer_prompts.txt goes through `tomeserve-gen tokenize --model DIR [--pad]` and through
CLIPTokenizer(truncation=True, max_length=77[, padding="max_length"]); the id lists must be identical for 100%
of the prompts (ids are discrete: there is no tolerance). The same for SDXL's tokenizer_2 (tiny-xl preset,
TOMESERVE_TINY_XL_MODEL), whose pad token "!" is a special token.

Environment:
  TOMESERVE_BIN_DIR      folder holding tomeserve-gen (default <repo>/build/bin); the test skips if it is absent.
  TOMESERVE_TINY_MODEL   diffusers model folder whose tokenizer/ has vocab.json + merges.txt. Without it the
                         CLIP vocabulary is built from build/cache/bpe_simple_vocab_16e6.txt.gz (scripts/clip_vocab.py).

The prompts file is split on "\\n" only: some prompts hold U+0085, U+2028, \\v or \\f, which str.splitlines() would
treat as line breaks. The CLI must likewise split stdin on "\\n" alone and strip nothing else.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPTS_FILE = REPO / "tests" / "tokenizer_prompts.txt"
MAX_LENGTH = 77
MAX_REPORTED = 25


def load_prompts() -> list[str]:
    text = PROMPTS_FILE.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{PROMPTS_FILE} must end with a newline"
    return text[:-1].split("\n")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return load_prompts()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    env = os.environ.get("TOMESERVE_TINY_MODEL")
    if env:
        return Path(env)
    sys.path.insert(0, str(REPO / "scripts"))
    import clip_vocab

    if not clip_vocab.DEFAULT_BPE_PATH.exists():
        pytest.skip(f"set TOMESERVE_TINY_MODEL or provide {clip_vocab.DEFAULT_BPE_PATH}")
    model = tmp_path_factory.mktemp("clip_model")
    clip_vocab.write_clip_vocab(model / "tokenizer")
    return model


@pytest.fixture(scope="module")
def cli() -> Path:
    from conftest import binary

    return binary("tomeserve-gen")


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer")


def run_cli(cli: Path, model_dir: Path, prompts: list[str], pad: bool, subfolder="tokenizer") -> list[list[int]]:
    cmd = [str(cli), "tokenize", "--model", str(model_dir), "--tokenizer", subfolder] + (["--pad"] if pad else [])
    stdin = ("\n".join(prompts) + "\n").encode("utf-8")
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
    lines = proc.stdout.decode("utf-8").splitlines()
    assert len(lines) == len(prompts), f"CLI printed {len(lines)} lines for {len(prompts)} prompts"
    return [json.loads(line) for line in lines]


def test_prompts_file_is_well_formed(prompts):
    assert len(prompts) >= 500
    assert all(p.strip(" ") for p in prompts), "blank prompt line"
    assert all("\r" not in p for p in prompts)


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
def test_ids_match_transformers(cli, model_dir, reference, prompts, pad):
    got = run_cli(cli, model_dir, prompts, pad)
    want = reference(
        prompts, truncation=True, max_length=MAX_LENGTH, padding="max_length" if pad else False
    ).input_ids
    mismatches = [(p, w, g) for p, w, g in zip(prompts, want, got) if w != g]
    report = "\n".join(
        f"prompt {p!r}\n  transformers: {w}\n  tomeserve:    {g}" for p, w, g in mismatches[:MAX_REPORTED]
    )
    assert not mismatches, (
        f"{len(prompts) - len(mismatches)}/{len(prompts)} prompts match "
        f"({'padded' if pad else 'unpadded'}); first {min(len(mismatches), MAX_REPORTED)} mismatches:\n{report}"
    )


@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
def test_sdxl_tokenizer_2_ids_match_transformers(cli, prompts, pad):
    """SDXL's tokenizer_2 (tiny-xl preset) pads with "!", which transformers then treats as a special token:
    every "!" in a prompt is cut out as the pad id rather than merged by BPE."""
    model = os.environ.get("TOMESERVE_TINY_XL_MODEL")
    if not model:
        pytest.skip("TOMESERVE_TINY_XL_MODEL not set")
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    assert reference.pad_token == "!" and reference.pad_token_id == 0
    got = run_cli(cli, Path(model), prompts, pad, "tokenizer_2")
    want = reference(prompts, truncation=True, max_length=MAX_LENGTH,
                     padding="max_length" if pad else False).input_ids
    mismatches = [(p, w, g) for p, w, g in zip(prompts, want, got) if w != g]
    assert any("!" in p for p in prompts)
    assert not mismatches, f"{len(mismatches)}/{len(prompts)} differ; first: {mismatches[:3]}"
