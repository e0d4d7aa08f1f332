// The artifact checks that need no TVM: manifest.json parsing and validation, file names,
// the safetensors header against the manifest's params, and the one-line error messages.
// modec.cc (the C API) and the fuzz targets (runtime/fuzz/) both call these on byte buffers.
#ifndef MODEC_SRC_ARTIFACT_CHECK_H_
#define MODEC_SRC_ARTIFACT_CHECK_H_

#include <modec/modec.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace modec {
namespace artifact {

constexpr const char* kSchema = "modec.artifact/1";
constexpr uint64_t kMaxHeader = 100u << 20;  // safetensors header cap (same as the format's)

/*! \brief A refusal with its status; modec.cc converts it to a code at the C boundary. */
struct Failure {
  modec_status status;
  std::string message;
};

[[noreturn]] void Fail(modec_status st, const std::string& msg);

struct DtypeInfo {
  const char* numpy;
  const char* safetensors;
  modec_dtype code;
  size_t size;
};

const DtypeInfo* ByNumpy(const std::string& s);
const DtypeInfo* ByCode(modec_dtype c);
/*! \brief Every dtype the artifact may hold (the modec_dtype codes, in code order). */
const std::vector<DtypeInfo>& Dtypes();

struct Spec {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;       // -1 for a symbolic dim
  std::vector<std::string> symbol;  // the symbol's name ("" for static dims)
};

/*! \brief file name -> (sha256 hex, byte size), as listed in the manifest's `files`. */
using FileTable = std::map<std::string, std::pair<std::string, int64_t>>;

/*! \brief One cached tensor of sections.generation.cache: the input it is read from and the
 * output it comes back as (docs/generation.md). */
struct CacheSpec {
  std::string past;     // an input, past_key_values.{i}.key|value
  std::string present;  // an output, present.{i}.key|value
};

/*! \brief sections.generation, checked against the manifest's inputs and outputs. The input
 * names are "" where the section says null. */
struct Generation {
  std::vector<CacheSpec> cache;
  std::string tokens;          // int64 [batch, seq] input
  std::string attention_mask;  // int64 [batch, past + seq] input, or ""
  std::string position_ids;    // int64 [batch, seq] input, or ""
  std::string logits;          // float32 [batch, seq, vocab] output
  std::string decode_entry;    // VM function of a decode step ("decode", or "main")
  // Its inputs in calling order: the step inputs above, the cache's past inputs, and inputs
  // of the prompt (read again at every step: the decode entry "main" takes them all).
  std::vector<Spec> decode_inputs;
  // decode.cache_in_place (docs/generation.md, "The cache in place"): the decode entry's past
  // inputs are buffers [batch, heads, capacity, head dim] it writes the step's positions into,
  // and it takes a shape argument [P] (the positions they hold) after its inputs.
  bool cache_in_place = false;
};

struct Manifest {
  std::string entry = "main";
  std::string device;  // target.device
  // target.archs of a CUDA artifact: the SASS architectures its fatbins hold ("sm_90",
  // "sm_90a"...), never empty for device "cuda"; empty for a CPU artifact.
  std::vector<std::string> archs;
  std::vector<Spec> inputs, outputs, params;
  FileTable files;
  // sections.generation: absent (has_generation false), or parsed into `generation`. A
  // section of the wrong structure (fields, JSON types, names that are not the model's) is
  // refused like any other field (the Python runtime refuses it at load too); one the
  // generation loop cannot use (a token input that is not int64 ids...) opens, runs with
  // modec_run, and has the reason in generation_error, which the generation calls report.
  bool has_generation = false;
  Generation generation;
  std::string generation_error;
};

/*! \brief Parse and validate manifest.json's text (docs/artifact.md, checks 1 and 2 but the
 * device, which the caller compares). `path` names the file in messages; `host_machine` is
 * the CPU architecture a CPU artifact must have been built for. Throws Failure
 * (MODEC_ERR_MANIFEST, MODEC_ERR_TARGET). */
Manifest ParseManifest(const std::string& text, const std::string& path, const std::string& host_machine);

/*! \brief Whether `arch` is a CUDA SASS architecture name as target.archs holds them:
 * `sm_` then digits (major, then one digit of minor), an optional `a` (^sm_[0-9]+a?$), with a
 * major of at least 1 ("sm_90" is 9.0, "sm_100" 10.0, "sm_90a" 9.0 arch-specific). */
bool IsCudaArch(const std::string& arch);

/*! \brief The architecture name of a device's compute capability as the TVM runtime reports it
 * ("9.0" -> "sm_90", "10.0" -> "sm_100", "8.6" -> "sm_86"); "" for anything else. */
std::string CudaArchOf(const std::string& compute_version);

/*! \brief Whether SASS compiled for `sass` runs on a GPU of architecture `device` (both
 * IsCudaArch names; a device name has no `a`). Binary compatibility of cubins (CUDA C
 * Programming Guide, "Binary Compatibility"): code for sm_XY runs on sm_XZ of the same major X
 * with Z >= Y, never across majors; an arch-specific `a` target (sm_90a: wgmma, setmaxnreg)
 * runs on exactly that architecture. A fatbin of SASS only (no PTX to JIT) runs where one of
 * its entries does. */
bool CudaArchRuns(const std::string& sass, const std::string& device);

/*! \brief "" when one of `archs` (target.archs) runs on a GPU of architecture `device` named
 * `gpu` (CudaArchRuns), else modec_open's refusal: one line naming both and the fix. */
std::string CudaArchRefusal(const std::vector<std::string>& archs, const std::string& device, const std::string& gpu);

/*! \brief Whether an input name is a KV-cache input, `past_key_values.{digits}.key|value`
 * (modec.kv_cache.PAST): the one kind of input whose past-length dim (2) may be 0. */
bool IsPast(const std::string& name);

/*! \brief Refuse a `files` entry that is not a plain file name in the artifact directory
 * (empty, a path, hidden, or holding control characters). Throws Failure(MODEC_ERR_MANIFEST). */
void CheckFileName(const std::string& name);

/*! \brief Where one param's bytes are in the safetensors file. */
struct Slice {
  size_t offset;  // from the start of the file
  size_t bytes;
};

/*! \brief Check a whole safetensors file (`data`, `size` bytes) against the manifest's
 * params: the header parses, lists every param with its dtype and shape, and in-range offsets
 * that hold exactly the param's bytes. Other tensors (the padding `__pad.K` of an aligned
 * file) are not looked at. Returns one Slice per param, in params order. Only the 8-byte
 * prefix and the header are read, never the tensor data: `data` may be a mapping of the
 * file whose pages are not resident. `path` names the file in messages. Throws
 * Failure(MODEC_ERR_WEIGHTS). */
std::vector<Slice> CheckSafetensors(const char* data, size_t size, const std::vector<Spec>& params,
                                    const std::string& path);
/*! \brief The same on a file held in a string. */
std::vector<Slice> CheckSafetensors(const std::string& data, const std::vector<Spec>& params,
                                    const std::string& path);

/*! \brief Refuse a model.so that dlopen would map past its end (a truncated library: the
 * mapping succeeds and the first access to the missing pages is a SIGBUS). A 64-bit
 * little-endian ELF must hold its program headers, every segment's file bytes and its
 * section headers; anything else (another ELF class, not an ELF file) is left to dlopen,
 * which refuses it cleanly. Throws Failure(MODEC_ERR_RUNTIME). */
void CheckLibrary(const std::string& data, const std::string& path);

/*! \brief Element count of a static shape, or false when it overflows int64 (or has a
 * negative dim). */
bool NumElements(const std::vector<int64_t>& shape, int64_t* out);

/*! \brief The header promises a one-line, non-empty message: a path or a TVM message may hold
 * line breaks (a directory named "a\nb"), so each run of control characters becomes one space. */
std::string OneLine(const std::string& msg);

}  // namespace artifact
}  // namespace modec
#endif  // MODEC_SRC_ARTIFACT_CHECK_H_
