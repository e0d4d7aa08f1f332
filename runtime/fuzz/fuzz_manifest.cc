// libFuzzer target: manifest.json validation (artifact::ParseManifest + CheckFileName, what
// modec_open runs on the manifest before it reads any other file) on arbitrary bytes.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"

namespace a = modec::artifact;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  a::Manifest m;
  try {
    m = a::ParseManifest(text, "art/manifest.json", "x86_64");
  } catch (const a::Failure& f) {
    modec_fuzz::CheckFailure(f, {MODEC_ERR_MANIFEST, MODEC_ERR_TARGET});
    return 0;
  }
  // What an accepted manifest guarantees to modec.cc.
  modec_fuzz::Require(m.files.count("model.so") && m.files.count("weights.safetensors"), "required file not listed");
  for (const auto* specs : {&m.inputs, &m.outputs, &m.params}) {
    for (const a::Spec& s : *specs) {
      modec_fuzz::Require(s.dtype != nullptr, "spec without dtype");
      modec_fuzz::Require(s.shape.size() == s.symbol.size(), "shape and symbol lists differ");
      for (size_t d = 0; d < s.shape.size(); ++d) {
        modec_fuzz::Require(s.shape[d] >= -1, "dim below -1");
        modec_fuzz::Require(s.shape[d] == -1 || s.symbol[d].empty(), "a static dim with a symbol");
        if (specs == &m.params) modec_fuzz::Require(s.shape[d] >= 0, "param with a symbolic dim");
      }
    }
  }
  for (const auto& kv : m.files) {
    try {
      a::CheckFileName(kv.first);
    } catch (const a::Failure& f) {
      modec_fuzz::CheckFailure(f, {MODEC_ERR_MANIFEST});
      continue;
    }
    // An accepted name stays inside the directory and is a whole C string.
    modec_fuzz::Require(kv.first.find('/') == std::string::npos && kv.first.find('\0') == std::string::npos &&
                            !kv.first.empty() && kv.first[0] != '.',
                        "unsafe file name accepted: " + kv.first);
  }
  return 0;
}
