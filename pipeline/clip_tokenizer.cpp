#include "pipeline/clip_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {
namespace {

using json = nlohmann::json;

// The tokenizers library runs these through Oniguruma, whose Unicode \s is the White_Space property. PCRE2's
// \s under UCP also matches U+180E (no longer White_Space since Unicode 6.3), so the patterns name the
// property.
constexpr char kWhitespacePattern[] = R"(\p{White_Space}+)";
constexpr char kClipSplitPattern[] = R"(<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)"
                                     R"(|[\p{L}]+|[\p{N}]|[^\p{White_Space}\p{L}\p{N}]+)";
constexpr char kByteLevelSplitPattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+)"
    R"(|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+)";

constexpr std::string_view kEndOfWord = "</w>";

// GPT-2's reversible byte -> code point map: printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100 onwards in byte order.
char32_t ByteSymbol(uint8_t byte) {
  auto printable = [](int b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174; };
  if (printable(byte)) return byte;
  char32_t next = 256;
  for (int b = 0; b < byte; ++b) next += printable(b) ? 0 : 1;
  return next;
}

void AppendUtf8(char32_t cp, std::string* out) {
  utf8proc_uint8_t buf[4];
  const utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out->append(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// Replaces each maximal invalid subpart with U+FFFD (Unicode 3.9 "substitution of maximal subparts", as
// Python's decode(errors="replace") and Rust's from_utf8_lossy do). The result is valid UTF-8.
std::string SanitizeUtf8(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  size_t i = 0;
  while (i < in.size()) {
    const auto lead = static_cast<uint8_t>(in[i]);
    int need = 0;                  // continuation bytes the lead byte announces
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
    if (lead < 0x80) {
      out += in[i++];
      continue;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
      need = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      need = 2;
      if (lead == 0xE0) lo = 0xA0;
      if (lead == 0xED) hi = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      need = 3;
      if (lead == 0xF0) lo = 0x90;
      if (lead == 0xF4) hi = 0x8F;
    }
    int have = 0;
    while (have < need && i + 1 + have < in.size()) {
      const auto c = static_cast<uint8_t>(in[i + 1 + have]);
      if (c < (have == 0 ? lo : 0x80) || c > (have == 0 ? hi : 0xBF)) break;
      ++have;
    }
    if (need > 0 && have == need) {
      out.append(in.substr(i, 1 + need));
    } else {
      out += "\xEF\xBF\xBD";
    }
    i += 1 + have;
  }
  return out;
}

// Reads vocab.json (a flat JSON object token -> id) without building a DOM and without exceptions.
class VocabSax : public nlohmann::json_sax<json> {
 public:
  explicit VocabSax(absl::flat_hash_map<std::string, int32_t>* vocab) : vocab_(vocab) {}
  const std::string& error() const { return error_; }

  bool start_object(size_t) override { return ++depth_ == 1 || Fail("expected a flat object token -> id"); }
  bool end_object() override { return --depth_ >= 0; }
  bool key(string_t& k) override {
    key_ = std::move(k);
    return true;
  }
  bool number_unsigned(number_unsigned_t v) override {
    if (depth_ != 1 || v > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) return BadValue();
    vocab_->insert_or_assign(std::move(key_), static_cast<int32_t>(v));  // a repeated key: the last one wins
    return true;
  }
  bool number_integer(number_integer_t v) override {
    return v >= 0 ? number_unsigned(static_cast<number_unsigned_t>(v)) : BadValue();
  }
  bool null() override { return BadValue(); }
  bool boolean(bool) override { return BadValue(); }
  bool number_float(number_float_t, const string_t&) override { return BadValue(); }
  bool string(string_t&) override { return BadValue(); }
  bool binary(binary_t&) override { return BadValue(); }
  bool start_array(size_t) override { return BadValue(); }
  bool end_array() override { return false; }
  bool parse_error(size_t, const std::string&, const nlohmann::detail::exception& e) override {
    return Fail(e.what());  // what() carries the line and column
  }

 private:
  bool Fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }
  bool BadValue() {
    return Fail(depth_ == 1
                    ? absl::StrCat("token \"", key_, "\" has an id that is not an integer in [0, 2^31)")
                    : "expected a flat object token -> id");
  }

  absl::flat_hash_map<std::string, int32_t>* vocab_;
  std::string key_;
  std::string error_;
  int depth_ = 0;
};

}  // namespace

// A compiled PCRE2 pattern (UTF + UCP, JIT when available). The code is immutable after Compile() and PCRE2
// allows sharing it between threads; match data is allocated per call.
class ClipTokenizer::Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const char* pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                                     PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InternalError(absl::StrCat("pcre2_compile(", pattern, ") at ", offset, ": ",
                                              reinterpret_cast<const char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional: pcre2_match interprets when JIT is unavailable
    return std::unique_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }

  // Calls fn(begin, end) for each successive match in `subject`, which must be valid UTF-8, until fn returns
  // false. None of our patterns can match the empty string, so each match advances. The patterns have no
  // nested quantifiers (no backtracking blow-up), so pcre2_match only reports "no match" or, in theory, a
  // resource limit; either ends the scan.
  template <typename Fn>
  void ForEachMatch(std::string_view subject, Fn&& fn) const {
    pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
    const auto* bytes = reinterpret_cast<PCRE2_SPTR>(subject.data());
    PCRE2_SIZE start = 0;
    while (start < subject.size() &&
           pcre2_match(code_, bytes, subject.size(), start, PCRE2_NO_UTF_CHECK, data, nullptr) > 0) {
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
      if (ovector[1] <= start || !fn(ovector[0], ovector[1])) break;
      start = ovector[1];
    }
    pcre2_match_data_free(data);
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

ClipTokenizer::ClipTokenizer() = default;
ClipTokenizer::~ClipTokenizer() = default;

absl::StatusOr<std::unique_ptr<ClipTokenizer>> ClipTokenizer::Load(const std::filesystem::path& dir) {
  std::unique_ptr<ClipTokenizer> tok(new ClipTokenizer());
  for (auto [regex, pattern] :
       {std::pair{&tok->whitespace_, kWhitespacePattern}, std::pair{&tok->clip_split_, kClipSplitPattern},
        std::pair{&tok->byte_level_split_, kByteLevelSplitPattern}}) {
    absl::StatusOr<std::unique_ptr<Regex>> compiled = Regex::Compile(pattern);
    if (!compiled.ok()) return compiled.status();
    *regex = *std::move(compiled);
  }
  absl::flat_hash_map<std::string, int32_t> vocab;
  if (absl::Status s = tok->LoadVocab(dir / "vocab.json", &vocab); !s.ok()) return s;
  if (absl::Status s = tok->LoadMerges(dir / "merges.txt", vocab); !s.ok()) return s;
  if (absl::Status s = tok->LoadPadToken(dir, vocab); !s.ok()) return s;
  return tok;
}

absl::Status ClipTokenizer::LoadPadToken(const std::filesystem::path& dir,
                                         const absl::flat_hash_map<std::string, int32_t>& vocab) {
  pad_id_ = eos_id_;
  specials_ = {{std::string(kBosToken), bos_id_}, {std::string(kEosToken), eos_id_}};
  // transformers reads tokenizer_config.json first; special_tokens_map.json fills what it leaves out.
  for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
    const std::filesystem::path path = dir / name;
    std::ifstream in(path, std::ios::binary);
    if (!in) continue;
    const json j = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
    auto it = j.find("pad_token");
    if (it == j.end() || it->is_null()) continue;
    // A string, or an AddedToken object with its "content".
    const json* content = it->is_object() && it->contains("content") ? &(*it)["content"] : &*it;
    if (!content->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path.string(), ": \"pad_token\" must be a string or {\"content\": ...}"));
    }
    auto id = vocab.find(content->get<std::string>());
    if (id == vocab.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": pad token \"", content->get<std::string>(), "\" is not in vocab.json"));
    }
    pad_id_ = id->second;
    // A pad token of its own (SDXL's "!") is a special token too: transformers cuts it out of the raw text, so
    // "wow!!" gives "wow" and two pad ids, never BPE's "!!".
    if (pad_id_ != bos_id_ && pad_id_ != eos_id_) specials_.push_back({content->get<std::string>(), pad_id_});
    return absl::OkStatus();
  }
  return absl::OkStatus();
}

absl::Status ClipTokenizer::LoadVocab(const std::filesystem::path& path,
                                      absl::flat_hash_map<std::string, int32_t>* vocab) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  VocabSax sax(vocab);
  if (!json::sax_parse(in, &sax) || !sax.error().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": ", sax.error()));
  }
  for (auto [token, id] : {std::pair{kBosToken, &bos_id_}, std::pair{kEosToken, &eos_id_}}) {
    // Debian's abseil has its own string_view, so spell the token as a std::string for it.
    auto it = vocab->find(std::string(token));
    if (it == vocab->end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": special token ", std::string(token), " is missing"));
    }
    *id = it->second;
  }
  vocab_size_ = vocab->size();
  for (int b = 0; b < 256; ++b) {
    std::string symbol;
    AppendUtf8(ByteSymbol(static_cast<uint8_t>(b)), &symbol);
    auto it = vocab->find(symbol);
    byte_id_[b] = it == vocab->end() ? eos_id_ : it->second;
    it = vocab->find(symbol + std::string(kEndOfWord));
    byte_end_id_[b] = it == vocab->end() ? eos_id_ : it->second;
  }
  return absl::OkStatus();
}

absl::Status ClipTokenizer::LoadMerges(const std::filesystem::path& path,
                                       const absl::flat_hash_map<std::string, int32_t>& vocab) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::string line;
  int32_t rank = 0;
  for (int line_no = 1; std::getline(in, line); ++line_no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.starts_with("#version")) continue;
    const size_t space = line.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ":", line_no, ": expected \"left right\", got \"", line, "\""));
    }
    const std::string left = line.substr(0, space), right = line.substr(space + 1);
    int32_t ids[3];
    for (int k = 0; const std::string& token : {left, right, left + right}) {
      auto it = vocab.find(token);
      if (it == vocab.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path.string(), ":", line_no, ": token \"", token, "\" is not in vocab.json"));
      }
      ids[k++] = it->second;
    }
    const uint64_t key = (static_cast<uint64_t>(ids[0]) << 32) | static_cast<uint32_t>(ids[1]);
    merges_.insert_or_assign(key, Merge{rank++, ids[2]});
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path.string(), ": read error"));
  return absl::OkStatus();
}

std::vector<int32_t> ClipTokenizer::Encode(std::string_view text, int max_length) const {
  const size_t limit = static_cast<size_t>(std::max(max_length, 2) - 2);  // content ids between bos and eos
  const std::string clean = SanitizeUtf8(text);
  std::vector<int32_t> ids = {bos_id_};
  // Special tokens are matched in the raw text, leftmost first (they cannot overlap each other).
  size_t pos = 0;
  while (pos < clean.size() && ids.size() - 1 < limit) {
    size_t at = std::string::npos;
    const Special* found = nullptr;
    for (const Special& special : specials_) {
      const size_t where = clean.find(special.text, pos);
      if (where < at) {
        at = where;
        found = &special;
      }
    }
    EncodeSegment(std::string_view(clean).substr(pos, at - pos), limit + 1, &ids);
    if (found == nullptr) break;
    ids.push_back(found->id);
    pos = at + found->text.size();
  }
  ids.resize(std::min(ids.size(), limit + 1));
  ids.push_back(eos_id_);
  return ids;
}

std::vector<int32_t> ClipTokenizer::EncodePadded(std::string_view text, int max_length) const {
  std::vector<int32_t> ids = Encode(text, max_length);
  if (ids.size() < static_cast<size_t>(max_length)) ids.resize(static_cast<size_t>(max_length), pad_id());
  return ids;
}

void ClipTokenizer::EncodeSegment(std::string_view segment, size_t max_ids, std::vector<int32_t>* ids) const {
  if (segment.empty()) return;
  // 1. NFC. utf8proc_map takes an explicit length, so embedded NULs survive.
  utf8proc_uint8_t* nfc = nullptr;
  const utf8proc_ssize_t nfc_len =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(segment.data()),
                   static_cast<utf8proc_ssize_t>(segment.size()), &nfc,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  const std::string composed = nfc_len >= 0 ? std::string(reinterpret_cast<char*>(nfc), nfc_len)
                                            : std::string(segment);  // only on allocation failure
  std::free(nfc);
  // 2. Each whitespace run becomes one space.
  std::string spaced;
  size_t copied = 0;
  whitespace_->ForEachMatch(composed, [&](size_t begin, size_t end) {
    spaced.append(composed, copied, begin - copied).push_back(' ');
    copied = end;
    return true;
  });
  spaced.append(composed, copied);
  // 3. Per-character lowercase as Rust's char::to_lowercase. utf8proc gives the simple mapping; U+0130 is the
  // only character whose unconditional full lowercase mapping (SpecialCasing.txt) differs from it.
  std::string lower;
  lower.reserve(spaced.size());
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(spaced.data());
  for (utf8proc_ssize_t i = 0, n = static_cast<utf8proc_ssize_t>(spaced.size()); i < n;) {
    utf8proc_int32_t cp = 0;
    i += utf8proc_iterate(p + i, n - i, &cp);  // valid UTF-8 here, so always >= 1
    if (cp == 0x130) {
      lower += "i\xCC\x87";
    } else {
      AppendUtf8(static_cast<char32_t>(utf8proc_tolower(cp)), &lower);
    }
  }
  // 4. Pre-tokenize and BPE each piece.
  clip_split_->ForEachMatch(lower, [&](size_t begin, size_t end) {
    const std::string_view word = std::string_view(lower).substr(begin, end - begin);
    byte_level_split_->ForEachMatch(word, [&](size_t b, size_t e) {
      EncodePiece(word.substr(b, e - b), ids);
      return ids->size() < max_ids;
    });
    return ids->size() < max_ids;
  });
}

void ClipTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* ids) const {
  const auto n = static_cast<int64_t>(piece.size());
  auto byte = [&](int64_t i) { return static_cast<uint8_t>(piece[i]); };
  if (n == 1) {
    ids->push_back(byte_end_id_[byte(0)]);
    return;
  }
  // Mirrors tokenizers' Word::merge_all: a heap of candidate merges ordered by (rank, position); a candidate
  // is stale once its left symbol was absorbed or its pair no longer yields the same id.
  struct Symbol {
    int32_t id;
    int64_t prev, next;  // neighbours in the live list; -1 at the ends
    bool alive;
  };
  struct Candidate {
    int32_t rank;
    int64_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Symbol> symbols(n);
  for (int64_t i = 0; i < n; ++i) {
    symbols[i] = {i + 1 == n ? byte_end_id_[byte(i)] : byte_id_[byte(i)], i - 1, i + 1 == n ? -1 : i + 1,
                  true};
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto lookup = [&](int32_t left, int32_t right) {
    return merges_.find((static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right));
  };
  auto propose = [&](int64_t pos) {
    const Symbol& s = symbols[pos];
    if (s.next < 0) return;
    if (auto it = lookup(s.id, symbols[s.next].id); it != merges_.end()) {
      queue.push({it->second.rank, pos, it->second.new_id});
    }
  };
  for (int64_t i = 0; i + 1 < n; ++i) propose(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = lookup(left.id, right.id);
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) propose(left.prev);
    propose(top.pos);
  }
  for (int64_t i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

}  // namespace tomeserve::pipeline
