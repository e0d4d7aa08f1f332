// Shared checks of the fuzz targets: a refusal must be a modec Failure with an expected
// status and a message that is one non-empty line once OneLine() has cleaned it (what the
// C API hands out); anything else (another exception, a crash, a sanitizer report) is a
// finding. libFuzzer turns an abort into a crash report with the input that caused it.
#ifndef MODEC_FUZZ_FUZZ_UTIL_H_
#define MODEC_FUZZ_FUZZ_UTIL_H_

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "artifact_check.h"

namespace modec_fuzz {

[[noreturn]] inline void Finding(const std::string& what) {
  std::fprintf(stderr, "modec fuzz finding: %s\n", what.c_str());
  std::abort();
}

inline void Require(bool cond, const std::string& what) {
  if (!cond) Finding(what);
}

/*! \brief A refusal the loader may give: one of `allowed`, a message that is one line. */
inline void CheckFailure(const modec::artifact::Failure& f, std::initializer_list<modec_status> allowed) {
  bool ok = false;
  for (modec_status s : allowed) ok = ok || f.status == s;
  Require(ok, "unexpected status " + std::to_string(static_cast<int>(f.status)) + ": " + f.message);
  Require(!f.message.empty(), "empty failure message");
  std::string line = modec::artifact::OneLine(f.message);
  Require(!line.empty() && line.find('\n') == std::string::npos && line.find('\r') == std::string::npos,
          "message is not one line: " + line);
}

}  // namespace modec_fuzz
#endif  // MODEC_FUZZ_FUZZ_UTIL_H_
