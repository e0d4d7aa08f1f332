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
  modec_fuzz::Require(m.device == "cuda" ? !m.archs.empty() : m.archs.empty(), "archs of a non-CUDA target, or none");
  for (const std::string& arch : m.archs) modec_fuzz::Require(a::IsCudaArch(arch), "accepted CUDA arch " + arch);
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
  // An accepted generation section names the model's inputs and outputs; a usable one (no
  // generation_error) holds what modec.cc's prefill and decode steps index without checking.
  if (m.has_generation) {
    auto find = [](const std::vector<a::Spec>& specs, const std::string& name) -> const a::Spec* {
      for (const a::Spec& s : specs) {
        if (s.name == name) return &s;
      }
      return nullptr;
    };
    const a::Generation& g = m.generation;
    modec_fuzz::Require(!g.cache.empty() && find(m.inputs, g.tokens) && find(m.outputs, g.logits),
                        "generation section without a cache, tokens or logits accepted");
    for (const a::CacheSpec& c : g.cache) {
      modec_fuzz::Require(find(m.inputs, c.past) && find(m.outputs, c.present), "cache names not the model's");
    }
    if (m.generation_error.empty()) {
      for (const a::CacheSpec& c : g.cache) {
        modec_fuzz::Require(a::IsPast(c.past) && find(m.inputs, c.past)->shape.size() == 4 &&
                                find(m.outputs, c.present)->shape.size() == 4,
                            "usable cache entry of another rank");
      }
      modec_fuzz::Require(find(m.outputs, g.logits)->shape.size() == 3 &&
                              find(m.outputs, g.logits)->dtype->code == MODEC_FLOAT32 &&
                              find(m.inputs, g.tokens)->shape.size() == 2,
                          "usable generation with odd logits or tokens");
      for (const a::Spec& d : g.decode_inputs) modec_fuzz::Require(find(m.inputs, d.name), "decode input not main's");
    }
  } else {
    modec_fuzz::Require(m.generation_error.empty(), "generation_error without a generation section");
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
