// libFuzzer target: the safetensors check of modec_open (artifact::CheckSafetensors) against
// the manifest's params. Input: PARAMS '\0' FILE, where PARAMS is the manifest's "params" JSON
// array (validated by ParseManifest as in a real manifest) and FILE a whole weights.safetensors
// (8-byte header length, JSON header, data). JSON text holds no raw NUL, so the split is
// unambiguous; an input without a NUL is skipped.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_util.h"

namespace a = modec::artifact;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const char* p = reinterpret_cast<const char*>(data);
  const void* nul = std::memchr(p, '\0', size);
  if (nul == nullptr) return 0;
  const size_t split = static_cast<const char*>(nul) - p;
  const std::string params(p, split);
  const std::string file(p + split + 1, size - split - 1);  // exact size: ASan sees any overread
  a::Manifest m;
  try {
    m = a::ParseManifest(R"({"schema": "modec.artifact/1", "target": {"device": "cuda", "archs": ["sm_90"]}, "inputs": [],
        "outputs": [], "files": {"model.so": {"sha256": "", "bytes": 0},
        "weights.safetensors": {"sha256": "", "bytes": 0}}, "params": )" + params + "}",
                         "manifest.json", "x86_64");
  } catch (const a::Failure&) {
    return 0;  // not a params array (fuzz_manifest covers these refusals)
  }
  std::vector<a::Slice> slices;
  try {
    slices = a::CheckSafetensors(file, m.params, "art/weights.safetensors");
  } catch (const a::Failure& f) {
    modec_fuzz::CheckFailure(f, {MODEC_ERR_WEIGHTS});
    return 0;
  }
  modec_fuzz::Require(slices.size() == m.params.size(), "one slice per param");
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | static_cast<uint8_t>(file[i]);
  unsigned sum = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    const a::Spec& s = m.params[i];
    int64_t numel = 0;
    size_t bytes = 0;
    modec_fuzz::Require(a::NumElements(s.shape, &numel) &&
                            !__builtin_mul_overflow(static_cast<size_t>(numel), s.dtype->size, &bytes),
                        "accepted a shape whose byte size overflows");
    modec_fuzz::Require(slices[i].bytes == bytes, "slice size != shape size");
    modec_fuzz::Require(slices[i].offset >= 8 + header, "slice starts inside the header");
    modec_fuzz::Require(slices[i].offset <= file.size() && slices[i].bytes <= file.size() - slices[i].offset,
                        "slice past the end of the file");
    // Touch the bytes modec.cc copies (an out-of-bounds slice would be an ASan report).
    for (size_t k = 0; k < slices[i].bytes; k += 61) sum += static_cast<uint8_t>(file[slices[i].offset + k]);
    if (slices[i].bytes) sum += static_cast<uint8_t>(file[slices[i].offset + slices[i].bytes - 1]);
  }
  volatile unsigned sink = sum;
  (void)sink;
  return 0;
}
