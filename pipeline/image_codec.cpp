#include "pipeline/image_codec.h"

#include <png.h>

#include <algorithm>
#include <cfloat>
#include <charconv>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace tomeserve::pipeline {
namespace {

// ---- libpng glue. libpng reports errors by longjmp. The two functions that call setjmp (WriteRaw, ReadRaw)
// hold only trivially destructible locals and write into objects their callers own, so a longjmp skips no
// destructor.

// Decoding allocates width * height * 3 bytes up front: cap it (192 MiB) so a small hostile file cannot ask
// for more.
constexpr size_t kMaxPngPixels = size_t{1} << 26;

struct PngError {
  char message[256] = "unknown libpng error";
};

void OnPngError(png_structp png, png_const_charp msg) {
  auto* error = static_cast<PngError*>(png_get_error_ptr(png));
  std::snprintf(error->message, sizeof(error->message), "%s", msg);
  png_longjmp(png, 1);
}

void OnPngWarning(png_structp, png_const_charp) {}  // e.g. an ancillary chunk's bad CRC: libpng skips it

void OnPngWrite(png_structp png, png_bytep data, size_t size) {
  static_cast<std::string*>(png_get_io_ptr(png))->append(reinterpret_cast<const char*>(data), size);
}

struct ReadSource {
  const unsigned char* data;
  size_t size, pos;
};

void OnPngRead(png_structp png, png_bytep out, size_t size) {
  auto* src = static_cast<ReadSource*>(png_get_io_ptr(png));
  if (size > src->size - src->pos) png_error(png, "truncated PNG data");
  std::memcpy(out, src->data + src->pos, size);
  src->pos += size;
}

bool WriteRaw(const uint8_t* rgb, int width, int height, png_text* texts, int num_texts, int compression_level,
              std::string* out, PngError* error) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, error, OnPngError, OnPngWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_set_write_fn(png, out, OnPngWrite, nullptr);
  png_set_compression_level(png, compression_level);
  png_set_IHDR(png, info, width, height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  if (num_texts > 0) png_set_text(png, info, texts, num_texts);
  png_write_info(png, info);
  for (int y = 0; y < height; ++y) png_write_row(png, rgb + static_cast<size_t>(y) * width * 3);
  png_write_end(png, info);
  png_destroy_write_struct(&png, &info);
  return true;
}

bool ReadRaw(ReadSource* src, DecodedPng* out, PngError* error) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, error, OnPngError, OnPngWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  png_set_read_fn(png, src, OnPngRead);
  png_set_user_limits(png, kMaxPngDimension, kMaxPngDimension);
  png_read_info(png, info);
  const int color = png_get_color_type(png, info);
  if (png_get_bit_depth(png, info) == 16) png_set_strip_16(png);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) {
    png_set_expand_gray_1_2_4_to_8(png);
    png_set_gray_to_rgb(png);
  }
  png_set_strip_alpha(png);  // also drops the alpha that a tRNS chunk would add: RGB output only
  const int passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = static_cast<int>(png_get_image_width(png, info));
  out->height = static_cast<int>(png_get_image_height(png, info));
  const size_t row_bytes = static_cast<size_t>(out->width) * 3;
  if (static_cast<size_t>(out->width) * out->height > kMaxPngPixels) png_error(png, "image too large");
  if (png_get_rowbytes(png, info) != row_bytes) png_error(png, "unexpected row size after RGB conversion");
  out->rgb.resize(row_bytes * out->height);
  for (int pass = 0; pass < passes; ++pass) {
    for (int y = 0; y < out->height; ++y) png_read_row(png, out->rgb.data() + row_bytes * y, nullptr);
  }
  png_read_end(png, info);  // text chunks after the image data land in `info` too
  png_textp texts = nullptr;
  const int num_texts = png_get_text(png, info, &texts, nullptr);
  for (int i = 0; i < num_texts; ++i) {
    const png_text& t = texts[i];
    const bool utf8 = t.compression >= PNG_ITXT_COMPRESSION_NONE;  // iTXt (1, 2); tEXt, zTXt are -1, 0
    std::string text(t.text, utf8 ? t.itxt_length : t.text_length);
    if (!utf8) {  // tEXt/zTXt hold Latin-1
      std::string converted;
      for (unsigned char c : text) {
        if (c >= 0x80) converted += static_cast<char>(0xC0 | (c >> 6));
        converted += static_cast<char>(c < 0x80 ? c : 0x80 | (c & 0x3F));
      }
      text = std::move(converted);
    }
    out->text_chunks.emplace_back(t.key, std::move(text));
  }
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

// Decodes UTF-8 into code points; false on malformed input (overlong forms, surrogates, > U+10FFFF).
bool DecodeUtf8(absl::string_view s, std::vector<char32_t>* out) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const int len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    char32_t cp = len == 1 ? b : b & (0x7F >> len);
    for (int k = 1; k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c >> 6) != 0x2) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    static constexpr char32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    out->push_back(cp);
    i += len;
  }
  return true;
}

// ---- A1111 text helpers.
// Python's str.isspace() for ASCII (Unicode spaces beyond ASCII are not stripped here).
bool IsPySpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f'); }

absl::string_view PyStrip(absl::string_view s) {
  while (!s.empty() && IsPySpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsPySpace(s.back())) s.remove_suffix(1);
  return s;
}

// json.dumps(text, ensure_ascii=False): nlohmann escapes exactly what Python does (", \\, \b \f \n \r \t,
// other control characters as \u00xx) and passes the rest through. Invalid UTF-8 (Python strings cannot hold
// it) becomes U+FFFD.
std::string JsonQuote(absl::string_view text) {
  return nlohmann::json(std::string(text)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// A1111's infotext_utils.quote.
std::string Quote(absl::string_view value) {
  return value.find_first_of(",\n:") == absl::string_view::npos ? std::string(value) : JsonQuote(value);
}

// Python's repr of a float from the shortest round-trip digits that std::to_chars writes in scientific form
// ("7.5e+00", "1e-05"): positional for decimal exponents -4..15, else "d.ddde+XX".
template <typename T>
std::string PyFloatRepr(T value) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value, std::chars_format::scientific);
  absl::string_view sci(buf, end - buf);
  std::string sign;
  if (sci.front() == '-') {
    sign = "-";
    sci.remove_prefix(1);
  }
  const size_t e_pos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_pos)) {
    if (c != '.') digits += c;
  }
  int exp = 0;
  std::from_chars(sci.data() + e_pos + 1 + (sci[e_pos + 1] == '+'), sci.data() + sci.size(), exp);
  if (exp < -4 || exp >= 16) {
    std::string mantissa = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    return absl::StrCat(sign, mantissa, "e", exp < 0 ? "-" : "+", std::abs(exp) < 10 ? "0" : "",
                        std::abs(exp));
  }
  if (exp < 0) return absl::StrCat(sign, "0.", std::string(-exp - 1, '0'), digits);
  if (digits.size() <= static_cast<size_t>(exp) + 1) digits.append(exp + 1 - digits.size(), '0');
  std::string frac = digits.substr(exp + 1);
  return absl::StrCat(sign, digits.substr(0, exp + 1), ".", frac.empty() ? "0" : frac);
}

bool IsWordChar(char c) {
  return absl::ascii_isalnum(c) || c == '_' || static_cast<unsigned char>(c) >= 0x80;
}
bool IsKeyChar(char c) { return IsWordChar(c) || c == ' ' || c == '-' || c == '/'; }
// re_param.findall(line) with A1111's re_param = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)',
// evaluated by hand (the pattern backtracks only in ways that reduce to these scans). \w is approximated as
// ASCII alphanumerics, '_' and any non-ASCII byte.
std::vector<std::pair<std::string, std::string>> FindParams(absl::string_view line) {
  std::vector<std::pair<std::string, std::string>> found;
  const size_t n = line.size();
  size_t pos = 0;
  while (pos < n) {
    size_t i = pos;
    while (i < n && IsPySpace(line[i])) ++i;
    size_t k = i;
    bool key_ok = false;  // one \w character (all bytes of a UTF-8 sequence), then at least one key character
    if (k < n && IsWordChar(line[k])) {
      ++k;
      while (k < n && (static_cast<unsigned char>(line[k]) & 0xC0) == 0x80) ++k;
      key_ok = k < n && IsKeyChar(line[k]);
      while (k < n && IsKeyChar(line[k])) ++k;
    }
    if (!key_ok || k >= n || line[k] != ':') {
      ++pos;
      continue;
    }
    size_t v = k + 1;
    while (v < n && IsPySpace(line[v])) ++v;
    size_t value_end = std::string::npos;
    if (v < n && line[v] == '"') {  // "(?:\\.|[^\\"])+" followed by ',' or the end
      size_t q = v + 1;
      while (q < n && line[q] != '"') q += line[q] == '\\' ? 2 : 1;
      if (q < n && q > v + 1 && (q + 1 == n || line[q + 1] == ',')) value_end = q + 1;
    }
    if (value_end == std::string::npos) value_end = std::min(n, line.find(',', v));  // [^,]*
    found.emplace_back(std::string(line.substr(i, k - i)), std::string(line.substr(v, value_end - v)));
    pos = value_end < n ? value_end + 1 : n;
  }
  return found;
}

}  // namespace

absl::StatusOr<std::string> EncodePng(const uint8_t* rgb, int width, int height,
                                      const PngTextChunks& text_chunks, int compression_level) {
  if (rgb == nullptr) return absl::InvalidArgumentError("EncodePng: no pixel data");
  if (compression_level < 0 || compression_level > 9) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: compression level ", compression_level, " is outside 0..9"));
  }
  if (width <= 0 || height <= 0 || width > kMaxPngDimension || height > kMaxPngDimension) {
    return absl::InvalidArgumentError(
        absl::StrCat("EncodePng: size ", width, "x", height, " is outside 1..", kMaxPngDimension));
  }
  std::vector<std::string> texts;  // owned text bytes (Latin-1 for tEXt, UTF-8 for iTXt)
  std::vector<png_text> chunks(text_chunks.size());
  texts.reserve(text_chunks.size());
  for (size_t i = 0; i < text_chunks.size(); ++i) {
    const auto& [key, value] = text_chunks[i];
    const bool key_ok = !key.empty() && key.size() <= 79 && key.front() != ' ' && key.back() != ' ' &&
                        std::all_of(key.begin(), key.end(), [](char c) { return c >= 0x20 && c < 0x7F; });
    if (!key_ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("EncodePng: text keyword \"", key, "\" must be 1-79 printable ASCII characters"));
    }
    std::vector<char32_t> code_points;
    if (!DecodeUtf8(value, &code_points) || value.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("EncodePng: text for \"", key, "\" must be valid UTF-8 without NUL characters"));
    }
    const bool latin1 =
        std::all_of(code_points.begin(), code_points.end(), [](char32_t c) { return c <= 0xFF; });
    png_text& chunk = chunks[i];
    chunk.key = const_cast<char*>(key.c_str());
    if (latin1) {
      texts.emplace_back(code_points.begin(), code_points.end());  // each code point <= 0xFF is one byte
      chunk.compression = PNG_TEXT_COMPRESSION_NONE;
    } else {
      texts.push_back(value);
      chunk.compression = PNG_ITXT_COMPRESSION_NONE;
      chunk.lang = const_cast<char*>("");
      chunk.lang_key = const_cast<char*>("");
    }
    chunk.text = texts.back().data();
    chunk.text_length = texts.back().size();
  }
  std::string out;
  PngError error;
  if (!WriteRaw(rgb, width, height, chunks.data(), static_cast<int>(chunks.size()), compression_level, &out,
                &error)) {
    return absl::InternalError(absl::StrCat("EncodePng: libpng: ", error.message));
  }
  return out;
}

absl::StatusOr<DecodedPng> DecodePng(absl::string_view bytes) {
  if (bytes.size() < 8 || png_sig_cmp(reinterpret_cast<png_const_bytep>(bytes.data()), 0, 8) != 0) {
    return absl::InvalidArgumentError("DecodePng: not a PNG (bad signature)");
  }
  // libpng allocates a text chunk's declared length before reading it (png_set_chunk_malloc_max does not stop
  // that in 1.6.39): refuse chunks that claim more bytes than remain, so allocations stay within the input
  // size.
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t pos = 8; pos < bytes.size();) {
    const size_t length = bytes.size() - pos < 12 ? 0 : png_get_uint_32(data + pos);
    if (bytes.size() - pos < 12 || length > bytes.size() - pos - 12) {
      return absl::InvalidArgumentError(absl::StrCat("DecodePng: truncated or corrupt chunk at byte ", pos));
    }
    if (std::memcmp(data + pos + 4, "IEND", 4) == 0) break;  // anything after IEND is ignored, as libpng does
    pos += 12 + length;
  }
  ReadSource src{data, bytes.size(), 0};
  DecodedPng out;
  PngError error;
  if (!ReadRaw(&src, &out, &error))
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: ", error.message));
  return out;
}

std::string FormatA1111Number(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  if (std::fabs(value) > FLT_MAX) return PyFloatRepr(value);
  const auto narrow = static_cast<float>(value);
  return static_cast<double>(narrow) == value ? PyFloatRepr(narrow) : PyFloatRepr(value);
}

std::string FormatA1111Parameters(const GenerationParameters& p) {
  std::vector<std::pair<std::string, std::string>> fields = {{"Steps", absl::StrCat(p.steps)}};
  if (!p.sampler.empty()) fields.emplace_back("Sampler", p.sampler);
  fields.emplace_back("CFG scale", FormatA1111Number(p.cfg_scale));
  fields.emplace_back("Seed", absl::StrCat(p.seed));
  fields.emplace_back("Size", absl::StrCat(p.width, "x", p.height));
  if (!p.model.empty()) fields.emplace_back("Model", p.model);
  fields.insert(fields.end(), p.extra.begin(), p.extra.end());
  std::string line;
  for (const auto& [key, value] : fields) {
    if (!line.empty()) line += ", ";
    line += key == value ? key : absl::StrCat(key, ": ", Quote(value));
  }
  const std::string negative = p.negative_prompt.empty() ? "" : "\nNegative prompt: " + p.negative_prompt;
  return std::string(PyStrip(absl::StrCat(p.prompt, negative, "\n", line)));
}

absl::StatusOr<GenerationParameters> ParseA1111Parameters(absl::string_view text) {
  std::vector<absl::string_view> lines = absl::StrSplit(PyStrip(text), '\n');
  absl::string_view last = lines.back();
  lines.pop_back();
  std::vector<std::pair<std::string, std::string>> params = FindParams(last);
  if (params.size() < 3)
    return absl::InvalidArgumentError("A1111 parameters: no \"key: value\" line at the end");

  GenerationParameters p;
  bool in_negative = false;
  for (absl::string_view line : lines) {
    line = PyStrip(line);
    if (absl::StartsWith(line, "Negative prompt:")) {
      in_negative = true;
      line = PyStrip(line.substr(16));
    }
    std::string& target = in_negative ? p.negative_prompt : p.prompt;
    absl::StrAppend(&target, target.empty() ? "" : "\n", line);
  }
  for (auto& [key, value] : params) {
    if (value.empty()) continue;  // A1111's v[0] raises IndexError and the pair is skipped
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      nlohmann::json j = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
      if (j.is_string()) value = j.get<std::string>();
    }
    bool ok = true;
    if (key == "Steps") {
      ok = absl::SimpleAtoi(value, &p.steps);
    } else if (key == "Sampler") {
      p.sampler = value;
    } else if (key == "CFG scale") {
      ok = absl::SimpleAtod(value, &p.cfg_scale);
    } else if (key == "Seed") {
      ok = absl::SimpleAtoi(value, &p.seed);
    } else if (key == "Size") {
      std::vector<absl::string_view> wh = absl::StrSplit(value, 'x');
      ok = wh.size() == 2 && absl::SimpleAtoi(wh[0], &p.width) && absl::SimpleAtoi(wh[1], &p.height);
    } else if (key == "Model") {
      p.model = value;
    } else {
      p.extra.emplace_back(key, value);
    }
    if (!ok)
      return absl::InvalidArgumentError(
          absl::StrCat("A1111 parameters: bad ", key, " value \"", value, "\""));
  }
  return p;
}

}  // namespace tomeserve::pipeline
