// PNG codec and A1111 infotext tests. Torch-free; built under AddressSanitizer + UBSan so that corrupt and
// truncated PNG input is checked for memory errors, not only for an error status.
#include "pipeline/image_codec.h"

#include <png.h>
#include <zlib.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tomeserve::pipeline {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

std::vector<uint8_t> Gradient(int width, int height) {
  std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 7 + i / 3);
  return rgb;
}

TEST(Png, RoundTripWithTextChunks) {
  const std::vector<uint8_t> rgb = Gradient(7, 5);
  const PngTextChunks chunks = {{"parameters", "a café, naïve\nSteps: 20"},  // Latin-1: tEXt
                                {"Comment", "日本語 🤖"},               // beyond Latin-1: iTXt
                                {"Software", "tomeserve"},
                                {"Empty", ""}};
  auto png = EncodePng(rgb.data(), 7, 5, chunks);
  ASSERT_TRUE(png.ok()) << png.status();
  EXPECT_EQ(png->substr(1, 3), "PNG");
  EXPECT_NE(png->find("tEXtparameters"), std::string::npos);
  EXPECT_NE(png->find("iTXtComment"), std::string::npos);
  EXPECT_LT(png->find("tEXtparameters"), png->find("IDAT"));  // before the image data, as Pillow writes them

  auto decoded = DecodePng(*png);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->width, 7);
  EXPECT_EQ(decoded->height, 5);
  EXPECT_EQ(decoded->rgb, rgb);
  EXPECT_EQ(decoded->text_chunks, chunks);
}

TEST(Png, OnePixelAndNoText) {
  const uint8_t pixel[3] = {1, 2, 3};
  auto png = EncodePng(pixel, 1, 1, {});
  ASSERT_TRUE(png.ok()) << png.status();
  auto decoded = DecodePng(*png);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->rgb, std::vector<uint8_t>({1, 2, 3}));
  EXPECT_TRUE(decoded->text_chunks.empty());
}

TEST(Png, CompressionLevelChangesSizeNotPixels) {
  // A smooth 256x256 image, so that the zlib levels differ in size.
  std::vector<uint8_t> rgb(256 * 256 * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>((i / 3 % 256 + i / 768 * 3 + i % 3 * 40) / 2);
  std::vector<size_t> sizes;
  for (int level : {0, kPngFastCompression, kPngDefaultCompression, 9}) {
    auto png = EncodePng(rgb.data(), 256, 256, {{"parameters", "x"}}, level);
    ASSERT_TRUE(png.ok()) << png.status();
    auto decoded = DecodePng(*png);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->rgb, rgb) << "level " << level;
    sizes.push_back(png->size());
  }
  EXPECT_GT(sizes[0], sizes[1]);   // stored > fastest
  EXPECT_GE(sizes[1], sizes[3]);   // fastest >= best
  for (int level : {-1, 10}) {
    EXPECT_THAT(EncodePng(rgb.data(), 256, 256, {}, level).status().message(), HasSubstr("compression level"));
  }
}

TEST(Png, RejectsBadArguments) {
  const std::vector<uint8_t> rgb = Gradient(4, 4);
  for (auto [w, h] : {std::pair{0, 4}, std::pair{4, 0}, std::pair{-1, 4}, std::pair{4, -3},
                      std::pair{kMaxPngDimension + 1, 1}}) {
    auto png = EncodePng(rgb.data(), w, h, {});
    EXPECT_EQ(png.status().code(), absl::StatusCode::kInvalidArgument) << w << "x" << h;
  }
  EXPECT_EQ(EncodePng(nullptr, 4, 4, {}).status().code(), absl::StatusCode::kInvalidArgument);
  for (const std::string& key : {std::string(), std::string(80, 'k'), std::string("caf\xc3\xa9"),
                                 std::string(" lead"), std::string("tab\tkey")}) {
    EXPECT_THAT(EncodePng(rgb.data(), 4, 4, {{key, "x"}}).status().message(), HasSubstr("keyword")) << key;
  }
  for (const std::string& text : {std::string("bad \xff utf8"), std::string("nul\0inside", 10),
                                  std::string("\xed\xa0\x80 surrogate"), std::string("\xc0\xaf overlong")}) {
    EXPECT_THAT(EncodePng(rgb.data(), 4, 4, {{"k", text}}).status().message(), HasSubstr("UTF-8"));
  }
}

TEST(Png, CorruptInputGivesErrorsNotCrashes) {
  const std::vector<uint8_t> rgb = Gradient(9, 6);
  auto png = EncodePng(rgb.data(), 9, 6, {{"parameters", "x"}});
  ASSERT_TRUE(png.ok());
  EXPECT_FALSE(DecodePng("").ok());
  EXPECT_FALSE(DecodePng("not a png at all").ok());
  EXPECT_THAT(DecodePng(png->substr(0, 7)).status().message(), HasSubstr("signature"));
  // Every truncation fails: decoding reads through IEND.
  for (size_t len = 8; len < png->size(); ++len) {
    EXPECT_EQ(DecodePng(png->substr(0, len)).status().code(), absl::StatusCode::kInvalidArgument) << len;
  }
  // Every single-byte corruption either decodes (e.g. a damaged ancillary chunk is skipped) or fails cleanly.
  int failures = 0;
  for (size_t pos = 8; pos < png->size(); ++pos) {
    std::string bad = *png;
    bad[pos] = static_cast<char>(bad[pos] ^ 0x5A);
    auto decoded = DecodePng(bad);
    if (!decoded.ok()) {
      ++failures;
      EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
    } else {
      EXPECT_EQ(decoded->rgb.size(), static_cast<size_t>(decoded->width) * decoded->height * 3);
    }
  }
  EXPECT_GT(failures, 0);
}

TEST(Png, HugeDeclaredSizeIsRejected) {
  // A valid header declaring 20000x20000 with no image data: refused before any allocation.
  const std::vector<uint8_t> rgb = Gradient(2, 2);
  std::string png = EncodePng(rgb.data(), 2, 2, {}).value();
  const unsigned char size[8] = {0, 0, 0x4E, 0x20, 0, 0, 0x4E, 0x20};
  std::memcpy(png.data() + 16, size, 8);  // IHDR data starts after signature (8) + length (4) + type (4)
  const uint32_t crc = png_uint_32(crc32(0, reinterpret_cast<const Bytef*>(png.data() + 12), 17));
  const unsigned char crc_be[4] = {uint8_t(crc >> 24), uint8_t(crc >> 16), uint8_t(crc >> 8), uint8_t(crc)};
  std::memcpy(png.data() + 29, crc_be, 4);
  EXPECT_EQ(DecodePng(png).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Png, DecodesRgbaAndGrayToRgb) {
  // Other layouts written with libpng's simplified API: alpha is dropped, gray is replicated.
  const uint8_t rgba[2 * 4] = {10, 20, 30, 255, 40, 50, 60, 0};
  const uint8_t gray[2] = {7, 200};
  for (auto [format, pixels, want] : {std::tuple{png_uint_32{PNG_FORMAT_RGBA}, static_cast<const void*>(rgba),
                                                 std::vector<uint8_t>{10, 20, 30, 40, 50, 60}},
                                      std::tuple{png_uint_32{PNG_FORMAT_GRAY}, static_cast<const void*>(gray),
                                                 std::vector<uint8_t>{7, 7, 7, 200, 200, 200}}}) {
    png_image image;
    std::memset(&image, 0, sizeof(image));
    image.version = PNG_IMAGE_VERSION;
    image.width = 2;
    image.height = 1;
    image.format = format;
    png_alloc_size_t size = 0;
    ASSERT_TRUE(png_image_write_get_memory_size(image, size, 0, pixels, 0, nullptr));
    std::string bytes(size, '\0');
    ASSERT_TRUE(png_image_write_to_memory(&image, bytes.data(), &size, 0, pixels, 0, nullptr));
    bytes.resize(size);
    auto decoded = DecodePng(bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(decoded->rgb, want) << format;
  }
}

GenerationParameters Example() {
  GenerationParameters p;
  p.prompt = "a photo of a cat";
  p.negative_prompt = "blurry";
  p.steps = 20;
  p.sampler = "Euler a";
  p.cfg_scale = 7.5;
  p.seed = 42;
  p.width = 512;
  p.height = 512;
  p.model = "sd15";
  p.extra = {{"ToMe ratio", "0.5"}, {"ToMe max downsample", "1"}};
  return p;
}

TEST(A1111, FormatsLikeCreateInfotext) {
  GenerationParameters p = Example();
  EXPECT_EQ(
      FormatA1111Parameters(p),
      "a photo of a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, "
      "Size: 512x512, Model: sd15, ToMe ratio: 0.5, ToMe max downsample: 1");
  p.negative_prompt.clear();
  p.cfg_scale = 7;
  p.model.clear();
  p.extra = {{"Flag", "Flag"}};
  p.seed = 18446744073709551615u;
  EXPECT_EQ(FormatA1111Parameters(p),
            "a photo of a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.0, "
            "Seed: 18446744073709551615, Size: 512x512, Flag");
  p.prompt = "  ";  // the whole text is stripped, as A1111 does
  EXPECT_THAT(FormatA1111Parameters(p), ::testing::StartsWith("Steps: 20"));
}

TEST(A1111, QuotesValuesWithCommasColonsNewlines) {
  GenerationParameters p = Example();
  p.model = "my, model";
  p.extra = {{"Note", "a:\"b\"\n\\ \x01 café 日本"}, {"Plain", "say \"hi\""}};
  // Expected strings from Python: json.dumps(v, ensure_ascii=False).
  EXPECT_THAT(FormatA1111Parameters(p),
              HasSubstr(R"(Model: "my, model", Note: "a:\"b\"\n\\ \u0001 café 日本", Plain: say "hi")"));
}

TEST(A1111, NumbersAsPythonWritesThem) {
  EXPECT_EQ(FormatA1111Number(7.5), "7.5");
  EXPECT_EQ(FormatA1111Number(7.0), "7.0");
  EXPECT_EQ(FormatA1111Number(1e-05), "1e-05");
  EXPECT_EQ(FormatA1111Number(0.0001), "0.0001");
  EXPECT_EQ(FormatA1111Number(1e16), "1e+16");
  EXPECT_EQ(FormatA1111Number(1e15), "1000000000000000.0");
  EXPECT_EQ(FormatA1111Number(-0.0), "-0.0");
  EXPECT_EQ(FormatA1111Number(0.1), "0.1");
  EXPECT_EQ(FormatA1111Number(1.2345678901234567), "1.2345678901234567");
  EXPECT_EQ(FormatA1111Number(123456789012345.6), "123456789012345.6");
  EXPECT_EQ(FormatA1111Number(1.5e-7), "1.5e-07");
  EXPECT_EQ(FormatA1111Number(2.5e+20), "2.5e+20");
  EXPECT_EQ(FormatA1111Number(1e300), "1e+300");
  EXPECT_EQ(FormatA1111Number(7.3f), "7.3");  // a proto float widened: Python would print 7.300000190734863
  EXPECT_EQ(FormatA1111Number(1.0 / 0.0), "inf");
}

TEST(A1111, ParseRoundTrip) {
  for (GenerationParameters p : {Example(), GenerationParameters{}}) {
    for (const auto& [prompt, negative, model] :
         {std::tuple{"a cat", "", "sd15"},
          std::tuple{"line one\nline two", "bad, ugly\nworse", "my, model: v2"},
          std::tuple{"", "only negative", "m"},
          std::tuple{"café 日本 🤖, (masterpiece:1.2)", "", "quote \" and \\"}}) {
      p.prompt = prompt;
      p.negative_prompt = negative;
      p.model = model;
      p.extra.emplace_back("Weird", "a:\"b\"\n\\ \x01, end");
      const std::string text = FormatA1111Parameters(p);
      auto parsed = ParseA1111Parameters(text);
      ASSERT_TRUE(parsed.ok()) << parsed.status() << "\n" << text;
      EXPECT_EQ(parsed->prompt, p.prompt) << text;
      EXPECT_EQ(parsed->negative_prompt, p.negative_prompt) << text;
      EXPECT_EQ(parsed->steps, p.steps);
      EXPECT_EQ(parsed->sampler, p.sampler);
      EXPECT_EQ(parsed->cfg_scale, p.cfg_scale);
      EXPECT_EQ(parsed->seed, p.seed);
      EXPECT_EQ(parsed->width, p.width);
      EXPECT_EQ(parsed->height, p.height);
      EXPECT_EQ(parsed->model, p.model);
      EXPECT_EQ(parsed->extra, p.extra) << text;
    }
  }
}

TEST(A1111, ParsesA1111Docstring) {
  auto p = ParseA1111Parameters(
      "girl with an artist's beret, determined, blue eyes\nNegative prompt: ugly, fat, (((deformed))), "
      "[blurry]\n"
      "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b\n");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->prompt, "girl with an artist's beret, determined, blue eyes");
  EXPECT_EQ(p->negative_prompt, "ugly, fat, (((deformed))), [blurry]");
  EXPECT_EQ(p->steps, 20);
  EXPECT_EQ(p->sampler, "Euler a");
  EXPECT_EQ(p->cfg_scale, 7.0);
  EXPECT_EQ(p->seed, 965400086u);
  EXPECT_EQ(p->width, 512);
  EXPECT_EQ(p->height, 768);
  EXPECT_THAT(p->extra, ElementsAre(Pair("Model hash", "45dee52b")));
}

TEST(A1111, ParseErrors) {
  EXPECT_FALSE(ParseA1111Parameters("just a prompt").ok());
  EXPECT_FALSE(ParseA1111Parameters("").ok());
  EXPECT_THAT(ParseA1111Parameters("p\nSteps: many, Seed: 1, Size: 2x2").status().message(),
              HasSubstr("Steps"));
  EXPECT_THAT(ParseA1111Parameters("p\nSteps: 1, Seed: -1, Size: 2x2").status().message(), HasSubstr("Seed"));
  EXPECT_THAT(ParseA1111Parameters("p\nSteps: 1, Seed: 1, Size: 2by2").status().message(), HasSubstr("Size"));
}

}  // namespace
}  // namespace tomeserve::pipeline
