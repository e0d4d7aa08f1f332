#include "json.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <set>

namespace modec {

class JsonParser {
 public:
  explicit JsonParser(const std::string& t) : t_(t) {}

  Json ParseDocument() {
    Json v = Value(0);
    Ws();
    if (i_ != t_.size()) Fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void Fail(const char* what) const {
    throw JsonError(std::string("invalid JSON at byte ") + std::to_string(i_) + ": " + what);
  }
  void Ws() {
    while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
  }
  char Peek() {
    Ws();
    if (i_ >= t_.size()) Fail("unexpected end");
    return t_[i_];
  }
  void Expect(char c) {
    if (Peek() != c) Fail("unexpected character");
    ++i_;
  }
  void Literal(const char* lit) {
    size_t n = std::strlen(lit);
    if (t_.compare(i_, n, lit) != 0) Fail("bad literal");
    i_ += n;
  }

  Json Value(int depth) {
    if (depth > 64) Fail("nesting too deep");
    Json v;
    char c = Peek();
    if (c == '{') {
      v.kind_ = Json::kObject;
      ++i_;
      if (Peek() == '}') {
        ++i_;
        return v;
      }
      // A repeated key is refused: readers disagree on which one wins (this one would find the
      // first, Python's json and the safetensors crate keep the last).
      std::set<std::string> keys;
      while (true) {
        if (Peek() != '"') Fail("expected a key");
        std::string key = String();
        if (!keys.insert(key).second) Fail("duplicate key");
        Expect(':');
        v.obj_.emplace_back(std::move(key), Value(depth + 1));
        char d = Peek();
        ++i_;
        if (d == '}') break;
        if (d != ',') Fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.kind_ = Json::kArray;
      ++i_;
      if (Peek() == ']') {
        ++i_;
        return v;
      }
      while (true) {
        v.arr_.push_back(Value(depth + 1));
        char d = Peek();
        ++i_;
        if (d == ']') break;
        if (d != ',') Fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.kind_ = Json::kString;
      v.s_ = String();
    } else if (c == 't') {
      Literal("true");
      v.kind_ = Json::kBool;
      v.b_ = true;
    } else if (c == 'f') {
      Literal("false");
      v.kind_ = Json::kBool;
    } else if (c == 'n') {
      Literal("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      // RFC 8259: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? ("01", "1.", ".5", "+1" are not
      // numbers). Only integers are ever read (i64()); they must fit in int64.
      v.kind_ = Json::kNumber;
      size_t start = i_;
      if (t_[i_] == '-') ++i_;
      if (i_ < t_.size() && t_[i_] == '0') {
        ++i_;
      } else if (!Digits()) {
        Fail("bad number");
      }
      bool integral = true;
      if (i_ < t_.size() && t_[i_] == '.') {
        ++i_;
        integral = false;
        if (!Digits()) Fail("bad number");
      }
      if (i_ < t_.size() && (t_[i_] == 'e' || t_[i_] == 'E')) {
        ++i_;
        integral = false;
        if (i_ < t_.size() && (t_[i_] == '+' || t_[i_] == '-')) ++i_;
        if (!Digits()) Fail("bad number");
      }
      if (integral) {
        std::string num = t_.substr(start, i_ - start);
        errno = 0;
        long long n = std::strtoll(num.c_str(), nullptr, 10);
        if (errno != ERANGE) {  // out of int64's range: a number, but not an integer we read
          v.integral_ = true;
          v.int_ = n;
        }
      }
    } else {
      Fail("unexpected character");
    }
    return v;
  }

  std::string String() {
    Expect('"');
    std::string out;
    while (true) {
      if (i_ >= t_.size()) Fail("unterminated string");
      char c = t_[i_++];
      if (c == '"') break;
      if (static_cast<unsigned char>(c) < 0x20) Fail("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        --i_;
        Utf8(&out);
        continue;
      }
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (i_ >= t_.size()) Fail("bad escape");
      char e = t_[i_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          unsigned cp = Hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) Fail("bad \\u escape (lone surrogate)");
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a surrogate pair: one code point
            if (i_ + 2 > t_.size() || t_[i_] != '\\' || t_[i_ + 1] != 'u') Fail("bad \\u escape (lone surrogate)");
            i_ += 2;
            unsigned lo = Hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) Fail("bad \\u escape (lone surrogate)");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          AppendUtf8(cp, &out);
          break;
        }
        default: Fail("bad escape");
      }
    }
    return out;
  }

  /*! \brief One run of digits; false if there is none. */
  bool Digits() {
    size_t start = i_;
    while (i_ < t_.size() && t_[i_] >= '0' && t_[i_] <= '9') ++i_;
    return i_ > start;
  }

  /*! \brief Exactly four hex digits (strtoul alone would take a sign, spaces or "0x"). */
  unsigned Hex4() {
    if (i_ + 4 > t_.size()) Fail("bad \\u escape");
    unsigned cp = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      int h = Hex(t_[i_]);
      if (h < 0) Fail("bad \\u escape");
      cp = cp * 16 + static_cast<unsigned>(h);
    }
    return cp;
  }

  /*! \brief Copy one well-formed UTF-8 sequence (RFC 3629: no overlong forms, no surrogates,
   * nothing above U+10FFFF), as Python's decoder requires of manifest.json. */
  void Utf8(std::string* out) {
    const auto lead = static_cast<unsigned char>(t_[i_]);
    int len = 0;
    unsigned cp = 0;
    if (lead >= 0xC2 && lead <= 0xDF) {
      len = 2, cp = lead & 0x1Fu;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      len = 3, cp = lead & 0x0Fu;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      len = 4, cp = lead & 0x07u;
    } else {
      Fail("invalid UTF-8");
    }
    if (i_ + len > t_.size()) Fail("invalid UTF-8");
    for (int k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(t_[i_ + k]);
      if ((b & 0xC0u) != 0x80u) Fail("invalid UTF-8");
      cp = (cp << 6) | (b & 0x3Fu);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) {
      Fail("invalid UTF-8");
    }
    out->append(t_, i_, len);
    i_ += len;
  }

  static void AppendUtf8(unsigned cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  static int Hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  const std::string& t_;
  size_t i_ = 0;
};

Json Json::Parse(const std::string& text) { return JsonParser(text).ParseDocument(); }

const std::string& Json::str() const {
  if (kind_ != kString) throw JsonError("expected a string");
  return s_;
}
int64_t Json::i64() const {
  if (kind_ != kNumber || !integral_) throw JsonError("expected an integer");
  return int_;
}
bool Json::boolean() const {
  if (kind_ != kBool) throw JsonError("expected a boolean");
  return b_;
}
const std::vector<Json>& Json::array() const {
  if (kind_ != kArray) throw JsonError("expected an array");
  return arr_;
}
const std::vector<std::pair<std::string, Json>>& Json::object() const {
  if (kind_ != kObject) throw JsonError("expected an object");
  return obj_;
}
const Json* Json::find(const std::string& key) const {
  for (const auto& kv : object()) {
    if (kv.first == key) return &kv.second;
  }
  return nullptr;
}
const Json& Json::at(const std::string& key) const {
  const Json* v = find(key);
  if (v == nullptr) throw JsonError("missing field '" + key + "'");
  return *v;
}

}  // namespace modec
