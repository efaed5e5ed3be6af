"""Builds a Hugging Face style CLIP tokenizer folder (vocab.json + merges.txt) from OpenAI's BPE file.

The conversion follows openai/CLIP `simple_tokenizer.py` exactly, so the ids match the pinned CLIP tokenizer:
merges are lines[1 : 49152 - 256 - 2 + 1] of the BPE file; the vocabulary is the 256 byte symbols, the same
with "</w>" appended, one token per merge ("".join(pair)), then <|startoftext|> and <|endoftext|> (49408 ids).

Usable as a module (`import clip_vocab` with scripts/ on sys.path) or as a script:
    python scripts/clip_vocab.py OUT_DIR [--bpe PATH]
"""

import argparse
import gzip
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BPE_PATH = REPO_ROOT / "build" / "cache" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def load_clip_bpe(bpe_path: Path | str = DEFAULT_BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Returns (vocab token -> id, merges in rank order) as openai/CLIP builds them."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{bpe_path}: duplicate tokens in the CLIP vocabulary")
    return vocab, merges


def write_clip_vocab(out_dir: Path | str, bpe_path: Path | str = DEFAULT_BPE_PATH) -> Path:
    """Writes out_dir/vocab.json and out_dir/merges.txt (creating out_dir); returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_clip_bpe(bpe_path)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE_PATH, help="OpenAI bpe_simple_vocab_16e6.txt.gz")
    args = parser.parse_args()
    print(write_clip_vocab(args.out_dir, args.bpe))


if __name__ == "__main__":
    main()
