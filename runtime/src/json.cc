#include "json.h"

#include <cctype>
#include <cstdlib>
#include <cstring>

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
      while (true) {
        if (Peek() != '"') Fail("expected a key");
        std::string key = String();
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
      v.kind_ = Json::kNumber;
      size_t start = i_;
      if (t_[i_] == '-') ++i_;
      bool frac = false;
      while (i_ < t_.size() && (std::isdigit(static_cast<unsigned char>(t_[i_])) || t_[i_] == '.' ||
                                 t_[i_] == 'e' || t_[i_] == 'E' || t_[i_] == '+' || t_[i_] == '-')) {
        if (!std::isdigit(static_cast<unsigned char>(t_[i_]))) frac = true;
        ++i_;
      }
      std::string num = t_.substr(start, i_ - start);
      char* end = nullptr;
      v.num_ = std::strtod(num.c_str(), &end);
      if (end == num.c_str() || *end != '\0') Fail("bad number");
      if (!frac && num.size() < 19) {
        v.integral_ = true;
        v.int_ = std::strtoll(num.c_str(), nullptr, 10);
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
          if (i_ + 4 > t_.size()) Fail("bad \\u escape");
          unsigned cp = std::strtoul(t_.substr(i_, 4).c_str(), nullptr, 16);
          i_ += 4;
          // UTF-8 encode (surrogate pairs are kept as two 3-byte sequences: names are ASCII).
          if (cp < 0x80) {
            out.push_back(char(cp));
          } else if (cp < 0x800) {
            out.push_back(char(0xC0 | (cp >> 6)));
            out.push_back(char(0x80 | (cp & 0x3F)));
          } else {
            out.push_back(char(0xE0 | (cp >> 12)));
            out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
            out.push_back(char(0x80 | (cp & 0x3F)));
          }
          break;
        }
        default: Fail("bad escape");
      }
    }
    return out;
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
