// SHA-256 (FIPS 180-4), small and dependency-free, for the artifact checksums (x86 SHA
// extensions where the CPU has them).
#ifndef MODEC_SRC_SHA256_H_
#define MODEC_SRC_SHA256_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace modec {

class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t n);
  /*! \brief Finish and return the lowercase hex digest (the object is spent afterwards). */
  std::string HexDigest();

 private:
  void Block(const uint8_t* p);
  /*! \brief `blocks` consecutive 64-byte blocks: with the x86 SHA extensions where the CPU
   * has them (unless MODEC_SHA256_PORTABLE is set), else `Block` each. */
  void Blocks(const uint8_t* p, size_t blocks);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

}  // namespace modec
#endif  // MODEC_SRC_SHA256_H_
