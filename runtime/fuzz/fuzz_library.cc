// libFuzzer target: the truncated-library check of modec_open (artifact::CheckLibrary), run on
// model.so's bytes before dlopen. An accepted 64-bit little-endian ELF must have every program
// header, every segment's file bytes and every section header inside the file.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"

namespace a = modec::artifact;

namespace {

uint64_t Le(const std::string& d, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(d.at(at + i));
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string lib(reinterpret_cast<const char*>(data), size);
  try {
    a::CheckLibrary(lib, "art/model.so");
  } catch (const a::Failure& f) {
    modec_fuzz::CheckFailure(f, {MODEC_ERR_RUNTIME});
    return 0;
  }
  // Accepted: either not an ELF64 LE file (dlopen refuses it), or a complete one. Re-check
  // independently, with 128-bit arithmetic (no overflow to get wrong).
  if (size < 64 || lib.compare(0, 4, "\x7f" "ELF") != 0 || lib[4] != 2 || lib[5] != 1) return 0;
  const unsigned __int128 file = size;
  const uint64_t phoff = Le(lib, 32, 8), shoff = Le(lib, 40, 8);
  const uint64_t phentsize = Le(lib, 54, 2), phnum = Le(lib, 56, 2), shentsize = Le(lib, 58, 2), shnum = Le(lib, 60, 2);
  if (phentsize < 56) return 0;
  modec_fuzz::Require(phoff + static_cast<unsigned __int128>(phnum) * phentsize <= file, "program headers past the end");
  for (uint64_t i = 0; i < phnum; ++i) {
    const size_t ph = static_cast<size_t>(phoff + i * phentsize);
    const uint64_t off = Le(lib, ph + 8, 8), filesz = Le(lib, ph + 32, 8);
    modec_fuzz::Require(filesz == 0 || static_cast<unsigned __int128>(off) + filesz <= file, "segment past the end");
  }
  modec_fuzz::Require(shnum == 0 || shoff + static_cast<unsigned __int128>(shnum) * shentsize <= file,
                      "section headers past the end");
  return 0;
}
