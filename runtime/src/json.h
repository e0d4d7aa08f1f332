// A tiny, strict JSON reader (RFC 8259) for manifest.json and safetensors headers: objects
// keep key order and refuse a repeated key; strings must be UTF-8; numbers are validated and
// kept as an exact int64 when integral (the only numbers the loaders read); nesting stops at
// depth 64.
#ifndef MODEC_SRC_JSON_H_
#define MODEC_SRC_JSON_H_

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace modec {

/*! \brief Malformed JSON or a value of the wrong kind. */
class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Json {
 public:
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject };

  static Json Parse(const std::string& text);

  Kind kind() const { return kind_; }
  bool is(Kind k) const { return kind_ == k; }
  const std::string& str() const;
  int64_t i64() const;
  bool boolean() const;
  const std::vector<Json>& array() const;
  const std::vector<std::pair<std::string, Json>>& object() const;
  /*! \brief Member lookup; nullptr when absent (throws if not an object). */
  const Json* find(const std::string& key) const;
  /*! \brief Member lookup that throws JsonError naming the key when absent. */
  const Json& at(const std::string& key) const;

 private:
  friend class JsonParser;
  Kind kind_ = kNull;
  bool b_ = false;
  bool integral_ = false;
  int64_t int_ = 0;
  std::string s_;
  std::vector<Json> arr_;
  std::vector<std::pair<std::string, Json>> obj_;
};

}  // namespace modec
#endif  // MODEC_SRC_JSON_H_
