// Torch-free CLIP byte-level BPE tokenizer, id-for-id identical to the pinned transformers `CLIPTokenizer`
// (tokenizers backend) called with truncation=True, max_length=77 (and padding="max_length" for
// EncodePadded). tests/test_tokenizer_parity.py holds it to that over tests/tokenizer_prompts.txt.
//
// The pipeline it mirrors, in order:
//   1. The special tokens <|startoftext|> and <|endoftext|> (and a pad token of its own, SDXL tokenizer_2's "!")
//      are cut out of the raw text (exact and case-sensitive match, no stripping); each becomes its own id.
//   2. Every other segment is normalized: NFC, each run of White_Space becomes one " ", then per-character
//      full lowercase (so U+0130 becomes "i" U+0307; no final-sigma rule).
//   3. Pre-tokenization keeps the matches of CLIP's split regex and drops the rest (whitespace), then splits
//      each piece again with GPT-2's byte-level regex and maps its UTF-8 bytes to GPT-2's byte symbols.
//   4. Each piece is BPE-merged by merge rank, with "</w>" appended to its last symbol.
//   5. bos + ids + eos, truncated to max_length keeping bos and eos; padding uses eos.
// Invalid UTF-8 (which a Python str cannot hold) is first replaced with U+FFFD, one per maximal invalid
// subpart, as Python's bytes.decode("utf-8", "replace") does.
//
// Known divergence, from a sweep of every code point and 300k fuzzed strings: the Unicode tables differ.
// tokenizers' NFC carries Unicode 9.0 data, its regexes (Oniguruma) and lowercase (Rust std) Unicode 16.0;
// PCRE2 10.42 has 14.0 and utf8proc 2.8 has 15.0. Ids match for all text except text holding (a) letters,
// digits or case pairs first assigned in Unicode 15.0-16.0 (e.g. CJK Ext. H/I, U+A7CB), which we class as
// symbols, or (b) combining marks or canonical compositions first assigned in 10.0-16.0 (e.g. U+1DFA,
// U+0C3C), which we reorder/compose and tokenizers leaves as they are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace tomeserve::pipeline {

class ClipTokenizer {
 public:
  static constexpr int kMaxLength = 77;
  static constexpr std::string_view kBosToken = "<|startoftext|>";
  static constexpr std::string_view kEosToken = "<|endoftext|>";

  // Loads `dir`/vocab.json and `dir`/merges.txt (a diffusers model's tokenizer/ folder), and the pad token
  // from tokenizer_config.json or special_tokens_map.json where they name one. Both special tokens and the pad
  // token must be in the vocabulary, and every merge's two parts and their concatenation too. Errors name the
  // file and, for merges.txt, the line.
  static absl::StatusOr<std::unique_ptr<ClipTokenizer>> Load(const std::filesystem::path& dir);

  ClipTokenizer(const ClipTokenizer&) = delete;
  ClipTokenizer& operator=(const ClipTokenizer&) = delete;
  ~ClipTokenizer();

  // bos + ids + eos, truncated to max_length (keeping bos and eos), unpadded. max_length below 2 counts as 2.
  // Thread-safe: the tokenizer is immutable after Load() and Encode keeps all scratch state per call (there
  // is no BPE cache), so any number of threads may call it on one const instance.
  std::vector<int32_t> Encode(std::string_view text, int max_length = kMaxLength) const;
  // Encode() padded with pad_id() up to max_length.
  std::vector<int32_t> EncodePadded(std::string_view text, int max_length = kMaxLength) const;

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  // The pad token of tokenizer_config.json (else special_tokens_map.json): SD 1.x and SDXL's first tokenizer pad
  // with <|endoftext|> (the default, also the unknown token), SDXL's tokenizer_2 with "!".
  int32_t pad_id() const { return pad_id_; }
  size_t vocab_size() const { return vocab_size_; }

 private:
  class Regex;  // a compiled PCRE2 pattern; defined in the .cpp to keep pcre2.h out of this header
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };

  ClipTokenizer();
  absl::Status LoadVocab(const std::filesystem::path& path, absl::flat_hash_map<std::string, int32_t>* vocab);
  absl::Status LoadPadToken(const std::filesystem::path& dir, const absl::flat_hash_map<std::string, int32_t>& vocab);
  absl::Status LoadMerges(const std::filesystem::path& path,
                          const absl::flat_hash_map<std::string, int32_t>& vocab);
  // Appends the ids of one special-token-free segment of (valid UTF-8) text to `ids`, stopping once `ids`
  // holds at least `max_ids` entries (truncation keeps a prefix, so later pieces cannot matter).
  void EncodeSegment(std::string_view segment, size_t max_ids, std::vector<int32_t>* ids) const;
  // Appends the BPE ids of one pre-tokenized piece (raw UTF-8 bytes, before the byte-level mapping).
  void EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const;

  int32_t bos_id_ = 0;
  int32_t eos_id_ = 0;
  int32_t pad_id_ = 0;
  struct Special {
    std::string text;
    int32_t id;
  };
  std::vector<Special> specials_;  // cut out of the raw text before BPE: bos, eos, and a pad token of its own
  size_t vocab_size_ = 0;
  // Id of each byte's GPT-2 symbol alone and with "</w>" appended; eos (the unknown token) where absent.
  int32_t byte_id_[256] = {};
  int32_t byte_end_id_[256] = {};
  // (left id << 32 | right id) -> rank and merged id. A later duplicate line overrides an earlier one.
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::unique_ptr<Regex> whitespace_;        // \s+ as the normalizer's Replace sees it
  std::unique_ptr<Regex> clip_split_;        // CLIP's pre-tokenizer split (matches are kept)
  std::unique_ptr<Regex> byte_level_split_;  // GPT-2's split inside the ByteLevel pre-tokenizer
};

}  // namespace tomeserve::pipeline
