// libFuzzer target: the JSON reader (runtime/src/json.cc) on arbitrary bytes.
// Parse either succeeds or throws JsonError; on success every accessor on every node either
// answers or throws JsonError (never another exception, never a crash), and every string and
// key it produced is well-formed UTF-8 (checked here independently: raw bytes and \u escapes,
// surrogate pairs included, must decode to code points, as Python's reader would).
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "json.h"

using modec::Json;
using modec::JsonError;

namespace {

bool WellFormedUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3F);
    }
    const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

size_t Walk(const Json& j, int depth) {
  modec_fuzz::Require(depth <= 66, "parsed deeper than the parser allows");
  size_t n = 1;
  // Each accessor on the wrong kind must throw JsonError, on the right kind answer.
  try {
    (void)j.str();
    modec_fuzz::Require(j.is(Json::kString), "str() answered on a non-string");
  } catch (const JsonError&) {
    modec_fuzz::Require(!j.is(Json::kString), "str() threw on a string");
  }
  try {
    (void)j.i64();
    modec_fuzz::Require(j.is(Json::kNumber), "i64() answered on a non-number");
  } catch (const JsonError&) {
  }
  try {
    (void)j.boolean();
    modec_fuzz::Require(j.is(Json::kBool), "boolean() answered on a non-bool");
  } catch (const JsonError&) {
  }
  try {
    (void)j.find("schema");
    (void)j.at("name");
  } catch (const JsonError&) {
  }
  if (j.is(Json::kString)) modec_fuzz::Require(WellFormedUtf8(j.str()), "string is not UTF-8");
  if (j.is(Json::kArray)) {
    for (const Json& c : j.array()) n += Walk(c, depth + 1);
  } else if (j.is(Json::kObject)) {
    for (const auto& kv : j.object()) {
      modec_fuzz::Require(WellFormedUtf8(kv.first), "key is not UTF-8");
      n += Walk(kv.second, depth + 1);
    }
  }
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  Json j;
  try {
    j = Json::Parse(text);
  } catch (const JsonError& e) {
    std::string what = e.what();
    modec_fuzz::Require(what.rfind("invalid JSON at byte ", 0) == 0, "unexpected JsonError text: " + what);
    return 0;
  }
  Walk(j, 0);
  return 0;
}
