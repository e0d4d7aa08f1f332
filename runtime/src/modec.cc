// The modec C API on top of the TVM runtime (tvm_ffi headers only, see DESIGN.md).
#include <dlfcn.h>
#include <fcntl.h>
#include <sched.h>
#include <modec/modec.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "artifact_check.h"
#include "sha256.h"

namespace ffi = tvm::ffi;

namespace modec {
namespace {

using artifact::ByCode;
using artifact::DtypeInfo;
using artifact::Fail;
using artifact::Failure;
using artifact::Spec;

thread_local std::string g_last_error;

/*! \brief The DLPack type of a modec dtype (the TVM side of artifact::Dtypes()). */
DLDataType ToDL(modec_dtype c) {
  switch (c) {
    case MODEC_FLOAT32: return {kDLFloat, 32, 1};
    case MODEC_FLOAT16: return {kDLFloat, 16, 1};
    case MODEC_FLOAT64: return {kDLFloat, 64, 1};
    case MODEC_INT64: return {kDLInt, 64, 1};
    case MODEC_INT32: return {kDLInt, 32, 1};
    case MODEC_INT8: return {kDLInt, 8, 1};
    case MODEC_UINT8: return {kDLUInt, 8, 1};
    case MODEC_BOOL: return {kDLBool, 8, 1};
    case MODEC_UINT32: return {kDLUInt, 32, 1};
    case MODEC_UINT16: return {kDLUInt, 16, 1};
    case MODEC_INT16: return {kDLInt, 16, 1};
    case MODEC_UINT64: return {kDLUInt, 64, 1};
    case MODEC_BFLOAT16: return {kDLBfloat, 16, 1};
  }
  throw std::logic_error("unknown modec_dtype " + std::to_string(static_cast<int>(c)));
}

const DtypeInfo* ByDL(DLDataType t) {
  for (const auto& d : artifact::Dtypes()) {
    DLDataType dl = ToDL(d.code);
    if (t.code == dl.code && t.bits == dl.bits && t.lanes == dl.lanes) return &d;
  }
  return nullptr;
}

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

/*! \brief Data alignment the compiled kernels assume for every tensor argument: TVM marks
 * each DLTensor's data as 64-byte aligned and LLVM emits aligned vector loads (vmovaps on
 * zmm registers), so a misaligned param crashes the process (SIGSEGV). */
constexpr uintptr_t kAlign = 64;

/*! \brief A read-only mapping of the weights file, shared by every tensor that points into
 * it (the last one released unmaps it). */
struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base != nullptr) munmap(base, size);
  }
  const char* data() const { return static_cast<const char*>(base); }
};

/*! \brief The "allocator" of a tensor whose data is a slice of the mapping: nothing is
 * allocated or copied, the tensor keeps the mapping alive until it is freed. */
struct MappedAlloc {
  std::shared_ptr<const Mapping> mapping;
  const char* ptr;
  void AllocData(DLTensor* t) { t->data = const_cast<char*>(ptr); }  // PROT_READ: never written
  void FreeData(DLTensor*) {}
};

/*! \brief An open file descriptor, closed when it goes out of scope. */
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

void CheckRegular(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    Fail(MODEC_ERR_IO, path + " is not a regular file; copy the whole artifact directory");
  }
}

[[noreturn]] void SizeDiffers(const std::string& path, uint64_t got, int64_t want) {
  Fail(MODEC_ERR_CHECKSUM, path + " has " + std::to_string(got) + " bytes, the manifest says " +
                               std::to_string(want) + " (truncated or modified); copy the artifact again");
}

void CheckDigest(const std::string& path, Sha256* h, const std::string& want) {
  std::string got = h->HexDigest();
  if (got != want) {
    Fail(MODEC_ERR_CHECKSUM, path + " SHA-256 " + got.substr(0, 12) + "... does not match the manifest (" +
                                 want.substr(0, 12) + "...); the file is corrupted, copy the artifact again");
  }
}

std::string ReadFile(const std::string& path) {
  CheckRegular(path);
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail(MODEC_ERR_IO, path + " cannot be opened (missing?); copy the whole artifact directory");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) Fail(MODEC_ERR_IO, "reading " + path + " failed");
  return ss.str();
}

std::string HostMachine() {
  struct utsname u;
  if (uname(&u) != 0) return "";
  return u.machine;
}

// ---- tensors on a device -------------------------------------------------------------------
//
// On the CPU a tensor is host memory this library allocates (or a slice of the mapped weights
// file); on another device it is memory of the TVM runtime's device API, allocated and copied
// through the runtime's device-agnostic global functions (the ones the Python runtime uses).

/*! \brief A global function of the TVM runtime (registered by libtvm_runtime itself). */
ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) {
    Fail(MODEC_ERR_RUNTIME, std::string("the TVM runtime has no function '") + name + "'; reinstall apache-tvm");
  }
  return *f;
}

/*! \brief A tensor on `dev` holding a copy of the `nbytes` host bytes at `data` (the tensor's
 * size; `data` may be NULL when it is 0). */
ffi::Tensor Upload(ffi::ShapeView shape, DLDataType dtype, const void* data, size_t nbytes, DLDevice dev) {
  if (dev.device_type == kDLCPU) {
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), shape, dtype, dev);
    if (nbytes > 0) std::memcpy(t.data_ptr(), data, nbytes);
    return t;
  }
  ffi::Tensor t = Global("runtime.TVMTensorAllocWithScope")(ffi::Shape(shape.begin(), shape.end()), dtype, dev,
                                                             ffi::Optional<ffi::String>())
                      .cast<ffi::Tensor>();
  if (nbytes > 0) Global("runtime.TVMTensorCopyFromBytes")(t, const_cast<void*>(data), nbytes);
  return t;
}

/*! \brief `t` itself on the host, else a host copy of it (contiguous, checked by the caller). */
ffi::Tensor ToHost(const ffi::Tensor& t) {
  if (t.device().device_type == kDLCPU) return t;
  ffi::Tensor h = ffi::Tensor::FromNDAlloc(CPUAlloc(), t.shape(), t.dtype(), DLDevice{kDLCPU, 0});
  const size_t nbytes = ffi::GetDataSize(*h.GetDLTensorPtr());
  if (nbytes > 0) Global("runtime.TVMTensorCopyToBytes")(t, h.data_ptr(), nbytes);
  return h;
}

// ---- CUDA (docs/runtime_cuda.md) -----------------------------------------------------------

/*! \brief The TVM runtime's DeviceAttrKind codes read here (include/tvm/runtime/device_api.h). */
enum DeviceAttr : int { kAttrExist = 0, kAttrComputeVersion = 4, kAttrDeviceName = 5 };

/*! \brief The directory of the libtvm_runtime.so this process runs (its CUDA runtime was built
 * with it and lies beside it: in the wheel's lib/ and in an installed prefix), or "". */
std::string TvmRuntimeDir() {
  void* h = dlopen("libtvm_runtime.so", RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return "";
  std::string dir;
  Dl_info info;
  void* sym = dlsym(h, "TVMBackendAllocWorkspace");
  if (sym != nullptr && dladdr(sym, &info) != 0 && info.dli_fname != nullptr) {
    dir = info.dli_fname;
    dir = dir.find('/') == std::string::npos ? "" : dir.substr(0, dir.rfind('/'));
  }
  dlclose(h);  // a RTLD_NOLOAD handle: drops the reference it took, the library stays
  return dir;
}

/*! \brief TVM's CPU thread pool takes TVM_NUM_THREADS, else OMP_NUM_THREADS, else half the
 * hardware threads: half the cores on a machine without SMT. Where neither variable is set,
 * set TVM_NUM_THREADS to the physical cores this process may run on (distinct package and core
 * ids of the allowed CPUs' sysfs topology), as the Python runtime does; once per process,
 * before the first session creates the pool. Unreadable topology: TVM's default. */
void DefaultThreads() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (std::getenv("TVM_NUM_THREADS") != nullptr || std::getenv("OMP_NUM_THREADS") != nullptr) return;
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    std::set<std::pair<std::string, std::string>> cores;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &allowed)) continue;
      const std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
      std::ifstream package(topo + "physical_package_id"), core(topo + "core_id");
      std::string p, c;
      if (!(package >> p) || !(core >> c)) return;
      cores.emplace(p, c);
    }
    if (!cores.empty()) setenv("TVM_NUM_THREADS", std::to_string(cores.size()).c_str(), 0);
  });
}

/*! \brief Load TVM's CUDA runtime, libtvm_runtime_cuda.so (the CUDA device API and the loader
 * of model.so's CUDA module), once per process, with its symbols global as the Python runtime
 * loads it: from the directory of libtvm_runtime.so, else by name (LD_LIBRARY_PATH). It
 * needs the NVIDIA driver's libcuda.so.1 and the CUDA runtime libcudart.so.13. */
void LoadCudaRuntime() {
  static std::mutex mu;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mu);
  if (loaded) return;
  const char* name = "libtvm_runtime_cuda.so";
  const std::string dir = TvmRuntimeDir();
  std::string tried = name, error;
  struct stat st;
  if (!dir.empty() && stat((dir + "/" + name).c_str(), &st) == 0) {
    tried = dir + "/" + name;
    if (dlopen(tried.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {  // stays open on purpose
      loaded = true;
      return;
    }
    const char* e = dlerror();
    error = e ? e : "unknown error";
  }
  if (error.empty()) {
    if (dlopen(name, RTLD_NOW | RTLD_GLOBAL) != nullptr) {
      loaded = true;
      return;
    }
    const char* e = dlerror();
    error = e ? e : "unknown error";
  }
  Fail(MODEC_ERR_TARGET, "cannot load TVM's CUDA runtime " + tried + " (" + error +
                             "): device 'cuda' needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 runtime "
                             "(libcudart.so.13) on the library path; install the driver and add the CUDA runtime's "
                             "directory to LD_LIBRARY_PATH, or run a CPU build of the model on device 'cpu'");
}

/*! \brief Check that CUDA device 0 exists and can run one of `archs` (target.archs); else
 * refuse with MODEC_ERR_TARGET naming the GPU, its architecture and the fix. */
void CheckCudaDevice(const std::vector<std::string>& archs) {
  LoadCudaRuntime();
  std::string version, name;
  try {
    ffi::Function attr = Global("runtime.GetDeviceAttr");
    if (attr(static_cast<int>(kDLCUDA), 0, static_cast<int>(kAttrExist)).cast<int64_t>() == 0) {
      Fail(MODEC_ERR_TARGET, "no CUDA GPU: the CUDA runtime finds no device 0 (no GPU, CUDA_VISIBLE_DEVICES hides "
                             "it, or the NVIDIA driver is older than CUDA 13 needs); check nvidia-smi");
    }
    version = std::string(attr(static_cast<int>(kDLCUDA), 0, static_cast<int>(kAttrComputeVersion)).cast<ffi::String>());
    name = std::string(attr(static_cast<int>(kDLCUDA), 0, static_cast<int>(kAttrDeviceName)).cast<ffi::String>());
  } catch (const ffi::Error& e) {
    Fail(MODEC_ERR_TARGET, "cannot query CUDA device 0 (" + e.kind() + ": " + e.message() + "); check nvidia-smi");
  }
  const std::string device = artifact::CudaArchOf(version);
  if (device.empty()) {
    Fail(MODEC_ERR_TARGET, "CUDA device 0 (" + name + ") reports compute capability '" + version +
                               "', not a version like 9.0; check the NVIDIA driver");
  }
  const std::string refusal = artifact::CudaArchRefusal(archs, device, name);
  if (!refusal.empty()) Fail(MODEC_ERR_TARGET, refusal);
}

}  // namespace
}  // namespace modec

struct modec_session {
  std::string dir;
  std::string entry = "main";
  std::vector<modec::artifact::Spec> inputs, outputs, params;
  std::vector<std::string> archs;  // target.archs of a CUDA artifact
  // Non-nullable TVM handles, set by Open(); the library must outlive the VM and the tensors.
  std::optional<ffi::Module> lib;
  std::optional<ffi::Module> vm;
  std::optional<ffi::Function> main;
  // The params, in calling order. On the CPU: tensors into the mapped weights file (each holds
  // the mapping), or aligned copies of the params that are misaligned in the file; on a GPU:
  // device copies (the mapping is unmapped once they are made).
  std::vector<ffi::Tensor> weights;
  DLDevice dev{kDLCPU, 0};
  // Output storage (on the host) kept alive until the next run.
  std::vector<ffi::Tensor> last_out;
  std::vector<std::vector<int64_t>> last_shapes;
  // sections.generation (docs/generation.md): absent, parsed, or unusable (the reason).
  bool has_generation = false;
  modec::artifact::Generation generation;
  std::string generation_error;
  std::optional<ffi::Function> decode;  // its decode entry (set by Open when usable)
};

/*! \brief A generation in progress (docs/generation.md, "The loop"): the KV cache as the
 * tensors the VM returned (each `present` is the next call's `past`, never copied to the
 * host: on a GPU it stays in device memory), the attention mask on the host (one column of
 * ones more per step, copied in), the prompt's inputs a decode step reads again (on the
 * session's device), and the next-token logits of every row (a host copy). */
struct modec_generation {
  modec_session* s = nullptr;
  int64_t batch = 0;
  int64_t total = 0;                          // P + T: positions in the cache after the last call
  int64_t capacity = 0;                       // positions the cache tensors hold (>= total)
  std::vector<ffi::Tensor> cache;             // in generation.cache order
  std::vector<int64_t> mask;                  // [batch, total], when the model has a mask
  std::map<std::string, ffi::Tensor> prompt;  // prompt-only inputs the decode entry takes
  std::vector<float> logits;                  // [batch, vocab]: logits[b, -1, :] of the last call
  int64_t vocab = 0;
};

namespace modec {
namespace {

/*! \brief Read manifest.json and keep its specs in the session; returns the file table and
 * the device the artifact was built for. */
void LoadManifest(modec_session* s, artifact::FileTable* files, std::string* device) {
  std::string path = s->dir + "/manifest.json";
  artifact::Manifest m = artifact::ParseManifest(ReadFile(path), path, HostMachine());
  s->entry = std::move(m.entry);
  s->inputs = std::move(m.inputs);
  s->outputs = std::move(m.outputs);
  s->params = std::move(m.params);
  s->archs = std::move(m.archs);
  s->has_generation = m.has_generation;
  s->generation = std::move(m.generation);
  s->generation_error = std::move(m.generation_error);
  *files = std::move(m.files);
  *device = std::move(m.device);
}

/*! \brief Read a listed file and check its size and SHA-256; returns its bytes. */
std::string ReadVerified(const std::string& dir, const std::string& name,
                         const std::pair<std::string, int64_t>& want) {
  artifact::CheckFileName(name);
  std::string path = dir + "/" + name;
  std::string data = ReadFile(path);
  if (static_cast<int64_t>(data.size()) != want.second) SizeDiffers(path, data.size(), want.second);
  Sha256 h;
  h.Update(data.data(), data.size());
  CheckDigest(path, &h, want.first);
  return data;
}

/*! \brief Open a listed file and check its size and SHA-256, hashing it with read()s into a
 * 1 MiB buffer (the file is never held whole, and the pages read go through the page cache,
 * not into this process's memory). Returns the descriptor the bytes were hashed through and
 * the size: mapping that descriptor maps the checked file even if another file replaces it
 * by name meanwhile. */
int OpenVerified(const std::string& dir, const std::string& name, const std::pair<std::string, int64_t>& want,
                 uint64_t* size) {
  artifact::CheckFileName(name);
  std::string path = dir + "/" + name;
  CheckRegular(path);
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) Fail(MODEC_ERR_IO, path + " cannot be opened (missing?); copy the whole artifact directory");
  struct stat st;
  if (fstat(fd.fd, &st) != 0) Fail(MODEC_ERR_IO, "reading " + path + " failed");
  if (!S_ISREG(st.st_mode)) Fail(MODEC_ERR_IO, path + " is not a regular file; copy the whole artifact directory");
  if (st.st_size != want.second) SizeDiffers(path, static_cast<uint64_t>(st.st_size), want.second);
#ifdef POSIX_FADV_SEQUENTIAL
  posix_fadvise(fd.fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // a hint: larger read-ahead
#endif
  std::vector<char> buf(size_t{1} << 20);
  Sha256 h;
  uint64_t done = 0;
  for (;;) {
    ssize_t n = read(fd.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) Fail(MODEC_ERR_IO, "reading " + path + " failed: " + std::strerror(errno));
    if (n == 0) break;
    h.Update(buf.data(), static_cast<size_t>(n));
    done += static_cast<uint64_t>(n);
  }
  if (done != static_cast<uint64_t>(want.second)) SizeDiffers(path, done, want.second);  // changed meanwhile
  CheckDigest(path, &h, want.first);
  *size = done;
  int out = fd.fd;
  fd.fd = -1;
  return out;
}

/*! \brief Map the verified weights file and make the params tensors that point into the
 * mapping (no copy); a param whose data is not 64-byte aligned in the file (an artifact
 * written before the aligned layout) is copied into aligned memory instead. On a GPU every
 * param is copied from the mapping to device memory. */
void LoadWeights(modec_session* s, int descriptor, uint64_t size) {
  Fd fd(descriptor);
  const std::string path = s->dir + "/weights.safetensors";
  auto mapping = std::make_shared<Mapping>();
  if (size > 0) {
    if (size > std::numeric_limits<size_t>::max()) Fail(MODEC_ERR_IO, path + " is too large to map");
    void* base = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd.fd, 0);
    if (base == MAP_FAILED) Fail(MODEC_ERR_IO, "cannot map " + path + ": " + std::strerror(errno));
    mapping->base = base;
    mapping->size = static_cast<size_t>(size);
    // Shrunk since it was hashed: touching the pages past the new end would be a SIGBUS.
    struct stat st;
    if (fstat(fd.fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != size) {
      Fail(MODEC_ERR_CHECKSUM, path + " changed while it was loaded; copy the artifact again");
    }
  }
  std::vector<artifact::Slice> slices = artifact::CheckSafetensors(mapping->data(), mapping->size, s->params, path);
  const DLDevice host{kDLCPU, 0};
  for (size_t i = 0; i < slices.size(); ++i) {
    const Spec& p = s->params[i];
    const ffi::ShapeView shape(p.shape.data(), p.shape.size());
    const char* at = mapping->data() + slices[i].offset;
    if (s->dev.device_type != kDLCPU) {  // a device copy; the mapping goes when this returns
      s->weights.push_back(Upload(shape, ToDL(p.dtype->code), at, slices[i].bytes, s->dev));
      continue;
    }
    if (reinterpret_cast<uintptr_t>(at) % kAlign == 0) {
      s->weights.push_back(ffi::Tensor::FromNDAlloc(MappedAlloc{mapping, at}, shape, ToDL(p.dtype->code), host));
      continue;
    }
    ffi::Tensor w = ffi::Tensor::FromNDAlloc(CPUAlloc(), shape, ToDL(p.dtype->code), host);
    if (slices[i].bytes > 0) std::memcpy(w.data_ptr(), at, slices[i].bytes);
    s->weights.push_back(w);
  }
}

/*! \brief Make the TVM libraries' symbols visible to model.so.
 *
 * model.so calls libtvm_ffi (TVMFFIErrorSetRaisedFromCStrParts, when a kernel refuses its
 * arguments) without listing it as a dependency: the symbol must be global. It is when an
 * executable links this library, not when a host dlopens it with RTLD_LOCAL (Python's ctypes,
 * plugin loaders, JNI): then the first error raised inside model.so ended the process with
 * "symbol lookup error". Reopening the already loaded TVM libraries with RTLD_NOLOAD |
 * RTLD_GLOBAL moves them to the global scope (what the Python runtime does when it loads them). */
void ExposeTvmSymbols() {
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&TVMFFIErrorSetRaisedFromCStrParts), &info) != 0 && info.dli_fname) {
      dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);  // the handle stays open on purpose
    }
    for (const char* name : {"libtvm_ffi.so", "libtvm_runtime.so", "libtvm_runtime_extra.so"}) {
      dlopen(name, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);  // NULL (nothing to do) if not loaded
    }
  });
}

/*! \brief Load model.so from the bytes that were hashed, under a name no other load used.
 *
 * dlopen(DIR/model.so) would read the file again after its check, and, worse, return the
 * library this process already loaded under that name when the artifact was replaced since
 * (glibc matches the path first): the session would run the old model.so with the new
 * weights. So the checked bytes go into an anonymous memory file (memfd), which is loaded
 * through a symlink in a fresh temporary directory; the directory is removed once loaded (the
 * mapping keeps the memory file). Where that is not possible (no memfd, no writable temporary
 * directory, no /proc) the artifact's file is loaded by its path as before. */
ffi::Module LoadLibrary(const std::string& bytes, const std::string& path) {
  ExposeTvmSymbols();
  int fd = memfd_create("modec-model.so", MFD_CLOEXEC);
  if (fd < 0) return ffi::Module::LoadFromFile(path);
  std::string dir;
  auto cleanup = [&] {
    if (!dir.empty()) {
      unlink((dir + "/model.so").c_str());
      rmdir(dir.c_str());
    }
    close(fd);
  };
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/modec-lib-XXXXXX";
  std::string proc = "/proc/self/fd/" + std::to_string(fd);
  struct stat st;
  if (done != bytes.size() || mkdtemp(tmpl.data()) == nullptr) {
    cleanup();
    return ffi::Module::LoadFromFile(path);
  }
  dir = tmpl;
  if (stat(proc.c_str(), &st) != 0 || symlink(proc.c_str(), (dir + "/model.so").c_str()) != 0) {
    cleanup();
    return ffi::Module::LoadFromFile(path);
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(dir + "/model.so");
    cleanup();
    return lib;
  } catch (...) {
    cleanup();
    throw;
  }
}

void Open(modec_session* s, const std::string& device) {
  artifact::FileTable files;
  std::string built_for;
  LoadManifest(s, &files, &built_for);
  if (built_for != device) {
    Fail(MODEC_ERR_TARGET, "artifact built for device '" + built_for + "', this session runs on '" + device +
                               "': rebuild with the matching --target");
  }
  // Before any file is hashed: a machine without a usable GPU is told so at once.
  if (device == "cuda") {
    CheckCudaDevice(s->archs);
    s->dev = DLDevice{kDLCUDA, 0};
  }
  // model.so is read whole (its checked bytes are what gets loaded); every other file is
  // hashed through a small buffer, and weights.safetensors is then mapped, not read.
  std::string library;
  for (const auto& kv : files) {
    if (kv.first == "weights.safetensors") continue;
    if (kv.first == "model.so") {
      library = ReadVerified(s->dir, kv.first, kv.second);
    } else {
      uint64_t size = 0;
      Fd checked(OpenVerified(s->dir, kv.first, kv.second, &size));
    }
  }
  uint64_t size = 0;
  int weights = OpenVerified(s->dir, "weights.safetensors", files["weights.safetensors"], &size);
  LoadWeights(s, weights, size);
  artifact::CheckLibrary(library, s->dir + "/model.so");
  try {
    s->lib = LoadLibrary(library, s->dir + "/model.so");
    auto load_exec = (*s->lib)->GetFunction("vm_load_executable");
    if (!load_exec.has_value()) Fail(MODEC_ERR_RUNTIME, "model.so has no Relax VM executable");
    s->vm = (*load_exec)().cast<ffi::Module>();
    auto init = (*s->vm)->GetFunction("vm_initialization");
    if (!init.has_value()) Fail(MODEC_ERR_RUNTIME, "the VM has no vm_initialization");
    // (device type, device id, allocator: 2 = pooled); a non-CPU device also needs the host.
    if (s->dev.device_type == kDLCPU) {
      (*init)(static_cast<int>(kDLCPU), 0, 2);
    } else {
      (*init)(static_cast<int>(s->dev.device_type), 0, 2, static_cast<int>(kDLCPU), 0, 2);
    }
    auto main = (*s->vm)->GetFunction(s->entry);
    if (!main.has_value()) Fail(MODEC_ERR_RUNTIME, "the VM has no function '" + s->entry + "'");
    s->main = *main;
    if (s->has_generation && s->generation_error.empty()) {
      const std::string& name = s->generation.decode_entry;
      auto decode = name == "main" ? main : (*s->vm)->GetFunction(name);
      if (!decode.has_value()) Fail(MODEC_ERR_RUNTIME, "the VM has no function '" + name + "' (the decode entry)");
      s->decode = *decode;
      if (s->generation.cache_in_place && s->dev.device_type != kDLCPU) {
        s->generation_error = "its decode entry updates the cache in place, which this runtime does on CPU artifacts only";
      }
    }
  } catch (const ffi::Error& e) {
    Fail(MODEC_ERR_RUNTIME, std::string("TVM cannot load model.so: ") + e.message());
  }
}

void FillInfo(const Spec& sp, modec_tensor* info) {
  info->name = sp.name.c_str();
  info->dtype = sp.dtype->code;
  info->ndim = static_cast<int32_t>(sp.shape.size());
  info->shape = sp.shape.data();
  info->data = nullptr;
}

std::string Names(const std::vector<Spec>& specs) {
  std::string names;
  for (const Spec& sp : specs) names += (names.empty() ? "" : ", ") + sp.name;
  return names;
}

/*! \brief Check the caller's tensors against `specs`: every one named, known and given once,
 * none missing, with the spec's dtype, rank and static dims, every symbol the same size in
 * all of them (recorded in *sym). Every dim is >= 1 but the past length (dim 2) of a cache
 * input, which may be 0: an empty cache, a prompt (docs/generation.md). Returns the tensors
 * copied into TVM tensors on `dev`, in specs order. */
std::vector<ffi::Tensor> TakeInputs(const std::vector<Spec>& specs, const modec_tensor* in, size_t n_in,
                                    std::map<std::string, int64_t>* sym, DLDevice dev) {
  // Every given input is named, known and given once (then only missing ones remain).
  for (size_t i = 0; i < n_in; ++i) {
    if (in[i].name == nullptr) Fail(MODEC_ERR_INPUT, "input #" + std::to_string(i) + " has no name (NULL)");
    bool known = false;
    for (const Spec& sp : specs) known = known || sp.name == in[i].name;
    if (!known) {
      Fail(MODEC_ERR_INPUT, std::string("unknown input '") + in[i].name + "'; the model's inputs are " + Names(specs));
    }
    for (size_t j = 0; j < i; ++j) {
      if (std::strcmp(in[j].name, in[i].name) == 0) {
        Fail(MODEC_ERR_INPUT, std::string("input '") + in[i].name + "' given twice");
      }
    }
  }
  std::vector<ffi::Tensor> args;
  for (const Spec& sp : specs) {
    const modec_tensor* t = nullptr;
    for (size_t i = 0; i < n_in; ++i) {
      if (in[i].name != nullptr && sp.name == in[i].name) t = &in[i];
    }
    if (t == nullptr) Fail(MODEC_ERR_INPUT, "missing input '" + sp.name + "'; the model's inputs are " + Names(specs));
    if (t->dtype != sp.dtype->code) {
      const DtypeInfo* got = ByCode(t->dtype);
      Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dtype differs: got " +
                                (got ? got->numpy : "code " + std::to_string(static_cast<int>(t->dtype))) +
                                ", expected " + sp.dtype->numpy);
    }
    if (t->ndim != static_cast<int32_t>(sp.shape.size())) {
      Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' has rank " + std::to_string(t->ndim) + ", expected " +
                                std::to_string(sp.shape.size()));
    }
    if (t->ndim > 0 && t->shape == nullptr) {
      Fail(MODEC_ERR_INVALID_ARGUMENT, "input '" + sp.name + "' has no shape (NULL)");
    }
    const bool past = artifact::IsPast(sp.name);
    for (int32_t d = 0; d < t->ndim; ++d) {
      int64_t got = t->shape[d];
      if (got < 0 || (got == 0 && !(past && d == 2))) {
        const char* rule = past ? " (must be >= 1; only the past length, dim 2, may be 0)" : " (must be >= 1)";
        Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " is " + std::to_string(got) + rule);
      }
      if (sp.shape[d] >= 0 && got != sp.shape[d]) {
        Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " is " + std::to_string(got) +
                                  ", expected " + std::to_string(sp.shape[d]));
      }
      if (sp.shape[d] < 0) {
        auto it = sym->emplace(sp.symbol[d], got).first;
        if (it->second != got) {
          Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " (" + sp.symbol[d] + ") is " +
                                    std::to_string(got) + " but another input has " + std::to_string(it->second));
        }
      }
    }
    int64_t numel = 0;
    if (!artifact::NumElements(std::vector<int64_t>(t->shape, t->shape + t->ndim), &numel) ||
        static_cast<uint64_t>(numel) > std::numeric_limits<size_t>::max() / sp.dtype->size) {
      Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' is too large (its byte size overflows)");
    }
    // An empty tensor (an empty cache) has no bytes to read: its data may be NULL.
    if (t->data == nullptr && numel > 0) Fail(MODEC_ERR_INVALID_ARGUMENT, "input '" + sp.name + "' has no data");
    args.push_back(Upload(ffi::ShapeView(t->shape, t->ndim), ToDL(sp.dtype->code), t->data,
                          static_cast<size_t>(numel) * sp.dtype->size, dev));
  }
  return args;
}

/*! \brief Call a VM function with `args` then the params. */
ffi::Any Call(const modec_session* s, const ffi::Function& f, const std::vector<ffi::Tensor>& args,
              const std::string& what, const ffi::Shape* length = nullptr) {
  std::vector<ffi::AnyView> views;
  for (const auto& a : args) views.emplace_back(a);
  if (length != nullptr) views.emplace_back(*length);
  for (const auto& w : s->weights) views.emplace_back(w);
  ffi::Any ret;
  try {
    f.CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
  } catch (const ffi::Error& e) {
    Fail(MODEC_ERR_RUNTIME, what + " failed: " + e.kind() + ": " + e.message());
  }
  return ret;
}

/*! \brief The outputs a VM call returned, checked against the manifest's (count, dtype, rank,
 * static dims, contiguous tensors on the host or the session's device), where they are: Run
 * copies them to the host, generation keeps the cache on the device. */
std::vector<ffi::Tensor> Outputs(const modec_session* s, const ffi::Any& ret) {
  std::vector<ffi::Tensor> outs;
  if (auto t = ret.try_cast<ffi::Tensor>()) {
    outs.push_back(*t);
  } else if (auto arr = ret.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *arr) {
      auto tt = x.try_cast<ffi::Tensor>();
      if (!tt) Fail(MODEC_ERR_RUNTIME, "the model returned a non-tensor output");
      outs.push_back(*tt);
    }
  } else {
    Fail(MODEC_ERR_RUNTIME, "the model returned neither a tensor nor a tuple");
  }
  if (outs.size() != s->outputs.size()) {
    Fail(MODEC_ERR_RUNTIME, "the model returned " + std::to_string(outs.size()) + " outputs, the manifest lists " +
                                std::to_string(s->outputs.size()));
  }
  for (size_t i = 0; i < outs.size(); ++i) {
    const ffi::Tensor& t = outs[i];
    const DtypeInfo* dt = ByDL(t.dtype());
    const int where = t.device().device_type;
    if (dt == nullptr || !t.IsContiguous() || (where != kDLCPU && where != s->dev.device_type)) {
      Fail(MODEC_ERR_RUNTIME, "output '" + s->outputs[i].name + "' is not a contiguous " +
                                  (s->dev.device_type == kDLCPU ? "host tensor" : "host or GPU tensor") +
                                  " of a known dtype");
    }
    ffi::ShapeView sh = t.shape();
    const Spec& sp = s->outputs[i];
    bool same = dt == sp.dtype && sh.size() == sp.shape.size();
    for (size_t d = 0; same && d < sh.size(); ++d) same = sp.shape[d] < 0 || sh[d] == sp.shape[d];
    if (!same) {
      std::string got = std::string(dt->numpy) + " [";
      for (size_t d = 0; d < sh.size(); ++d) got += (d ? ", " : "") + std::to_string(sh[d]);
      std::string want = std::string(sp.dtype->numpy) + " [";
      for (size_t d = 0; d < sp.shape.size(); ++d) {
        want += (d ? ", " : "") + (sp.shape[d] < 0 ? sp.symbol[d] : std::to_string(sp.shape[d]));
      }
      Fail(MODEC_ERR_RUNTIME, "output '" + sp.name + "' is " + got + "], the manifest says " + want +
                                  "]; manifest.json does not match model.so, rebuild the artifact");
    }
  }
  return outs;
}

const void* DataOf(const ffi::Tensor& t) {
  return static_cast<const char*>(t.data_ptr()) + t.GetDLTensorPtr()->byte_offset;
}

void Run(modec_session* s, const modec_tensor* in, size_t n_in, modec_tensor* out, size_t* n_out) {
  if (*n_out < s->outputs.size()) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "the outputs array holds " + std::to_string(*n_out) + ", the model has " +
                                         std::to_string(s->outputs.size()) + " outputs");
  }
  std::map<std::string, int64_t> sym;
  std::vector<ffi::Tensor> args = TakeInputs(s->inputs, in, n_in, &sym, s->dev);
  std::vector<ffi::Tensor> outs = Outputs(s, Call(s, *s->main, args, "model run"));
  for (ffi::Tensor& t : outs) t = ToHost(t);
  s->last_out = std::move(outs);
  s->last_shapes.clear();
  for (size_t i = 0; i < s->last_out.size(); ++i) {
    const ffi::Tensor& t = s->last_out[i];
    ffi::ShapeView sh = t.shape();
    s->last_shapes.emplace_back(sh.begin(), sh.end());
    out[i].name = s->outputs[i].name.c_str();
    out[i].dtype = ByDL(t.dtype())->code;
    out[i].ndim = static_cast<int32_t>(sh.size());
    out[i].shape = s->last_shapes.back().data();
    out[i].data = DataOf(t);
  }
  *n_out = s->last_out.size();
}

// ---- generation (docs/generation.md) -------------------------------------------------------

size_t OutputIndex(const modec_session* s, const std::string& name) {
  for (size_t i = 0; i < s->outputs.size(); ++i) {
    if (s->outputs[i].name == name) return i;
  }
  throw std::logic_error("no output " + name);  // ParseGeneration checked every name
}

/*! \brief Refuse generation on an artifact without a (usable) generation section. */
void NeedGeneration(const modec_session* s) {
  if (!s->has_generation) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "the artifact has no KV cache: export the model with past_key_values inputs");
  }
  if (!s->generation_error.empty()) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "the artifact cannot generate: " + s->generation_error);
  }
}

/*! \brief An int64 tensor on `dev` holding a copy of the host values `data`. */
ffi::Tensor HostTensor(const std::vector<int64_t>& shape, const int64_t* data, DLDevice dev) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return Upload(ffi::ShapeView(shape.data(), shape.size()), DLDataType{kDLInt, 64, 1}, data, n * sizeof(int64_t), dev);
}

/*! \brief logits[b, -1, :] of every row of a float32 [batch, seq, vocab] output, on the host. A
 * GPU's logits are not copied whole (a prompt's are seq times larger than needed): one row's
 * last position at a time, through a view of it. */
std::vector<float> LastLogits(const ffi::Tensor& logits, int64_t batch, int64_t seq, int64_t vocab) {
  std::vector<float> next(static_cast<size_t>(batch * vocab));
  const size_t row = static_cast<size_t>(vocab) * sizeof(float);
  if (logits.device().device_type == kDLCPU) {
    const float* p = static_cast<const float*>(DataOf(logits));
    for (int64_t b = 0; b < batch; ++b) std::memcpy(next.data() + b * vocab, p + (b * seq + seq - 1) * vocab, row);
    return next;
  }
  ffi::Function copy = Global("runtime.TVMTensorCopyToBytes");
  if (seq == 1) {
    copy(logits, static_cast<void*>(next.data()), row * static_cast<size_t>(batch));
    return next;
  }
  ffi::Function view = Global("runtime.TVMTensorCreateView");
  for (int64_t b = 0; b < batch; ++b) {
    const uint64_t offset = static_cast<uint64_t>(b * seq + seq - 1) * row;
    ffi::Tensor last = view(logits, ffi::Shape({vocab}), logits.dtype(), offset).cast<ffi::Tensor>();
    copy(last, static_cast<void*>(next.data() + b * vocab), row);
  }
  return next;
}

/*! \brief Take the outputs of a prefill or decode call into the generation: the present
 * tensors become the cache (checked: [batch, heads, capacity, head dim], capacity = total but
 * for a cache updated in place), logits[b, -1, :] the next-token logits. */
void Absorb(modec_generation* g, const std::vector<ffi::Tensor>& outs, int64_t total, int64_t capacity) {
  const modec_session* s = g->s;
  const artifact::Generation& gen = s->generation;
  const ffi::Tensor& logits = outs[OutputIndex(s, gen.logits)];
  ffi::ShapeView ls = logits.shape();
  if (ls[0] != g->batch || ls[1] < 1 || ls[2] < 1) {
    Fail(MODEC_ERR_RUNTIME, "output '" + gen.logits + "' has shape [" + std::to_string(ls[0]) + ", " +
                                std::to_string(ls[1]) + ", " + std::to_string(ls[2]) + "] for a batch of " +
                                std::to_string(g->batch) + "; rebuild the artifact");
  }
  std::vector<ffi::Tensor> cache;
  for (const artifact::CacheSpec& c : gen.cache) {
    const ffi::Tensor& t = outs[OutputIndex(s, c.present)];
    if (t.shape()[0] != g->batch || t.shape()[2] != capacity) {
      Fail(MODEC_ERR_RUNTIME, "output '" + c.present + "' holds " + std::to_string(t.shape()[2]) +
                                  " positions, expected " + std::to_string(capacity) + "; rebuild the artifact");
    }
    cache.push_back(t);
  }
  const int64_t seq = ls[1], vocab = ls[2];
  std::vector<float> next = LastLogits(logits, g->batch, seq, vocab);
  g->cache = std::move(cache);
  g->logits = std::move(next);
  g->vocab = vocab;
  g->total = total;
  g->capacity = capacity;
}

/*! \brief A cache updated in place (docs/generation.md, "The cache in place"): make each of
 * its tensors hold at least `capacity` positions, copying the `total` it holds into a new one
 * where it is smaller (on the host: the in-place decode entry exists on CPU artifacts only). */
void Reserve(modec_generation* g, int64_t capacity) {
  if (capacity <= g->capacity) return;
  std::vector<ffi::Tensor> grown;
  for (const ffi::Tensor& t : g->cache) {
    ffi::ShapeView sh = t.shape();
    const std::vector<int64_t> shape = {sh[0], sh[1], capacity, sh[3]};
    ffi::Tensor n = Upload(ffi::ShapeView(shape.data(), shape.size()), t.dtype(), nullptr, 0, t.device());
    const size_t row = static_cast<size_t>(sh[3]) * ((t.dtype().bits * t.dtype().lanes + 7) / 8);
    const char* src = static_cast<const char*>(DataOf(t));
    char* dst = static_cast<char*>(n.data_ptr());
    for (int64_t bh = 0; bh < sh[0] * sh[1]; ++bh) {
      std::memcpy(dst + bh * capacity * row, src + bh * g->capacity * row, static_cast<size_t>(g->total) * row);
    }
    grown.push_back(n);
  }
  g->cache = std::move(grown);
  g->capacity = capacity;
}

std::unique_ptr<modec_generation> Prefill(modec_session* s, const modec_tensor* in, size_t n_in) {
  NeedGeneration(s);
  const artifact::Generation& gen = s->generation;
  for (size_t i = 0; i < n_in; ++i) {
    if (in[i].name != nullptr && artifact::IsPast(in[i].name)) {
      Fail(MODEC_ERR_INPUT, std::string("input '") + in[i].name +
                                "' is the KV cache, which generation starts empty: pass the prompt's inputs only");
    }
  }
  std::vector<Spec> prompt_specs;
  for (const Spec& sp : s->inputs) {
    if (!artifact::IsPast(sp.name)) prompt_specs.push_back(sp);
  }
  // position_ids, when the model has them and the caller gave none: cumsum(mask) - 1,
  // clamped at 0 (docs/generation.md), as the Python runtime computes them.
  std::vector<modec_tensor> given(in, in + n_in);
  std::vector<int64_t> positions;
  if (!gen.position_ids.empty() && !gen.attention_mask.empty()) {
    const modec_tensor* mask = nullptr;
    bool has = false;
    for (const modec_tensor& t : given) {
      has = has || (t.name != nullptr && gen.position_ids == t.name);
      if (t.name != nullptr && gen.attention_mask == t.name) mask = &t;
    }
    if (!has && mask != nullptr && mask->dtype == MODEC_INT64 && mask->ndim == 2 && mask->shape != nullptr &&
        mask->shape[0] > 0 && mask->shape[1] > 0 && mask->data != nullptr) {
      const int64_t rows = mask->shape[0], cols = mask->shape[1];
      const int64_t* m = static_cast<const int64_t*>(mask->data);
      positions.resize(static_cast<size_t>(rows * cols));
      for (int64_t b = 0; b < rows; ++b) {
        int64_t sum = 0;
        for (int64_t j = 0; j < cols; ++j) {
          sum += m[b * cols + j];
          positions[b * cols + j] = std::max<int64_t>(sum - 1, 0);
        }
      }
      given.push_back(modec_tensor{gen.position_ids.c_str(), MODEC_INT64, 2, mask->shape, positions.data()});
    }
  }
  std::map<std::string, int64_t> sym;
  std::vector<ffi::Tensor> prompt = TakeInputs(prompt_specs, given.data(), given.size(), &sym, s->dev);
  auto by_name = [&](const std::string& name) -> const ffi::Tensor& {
    for (size_t i = 0; i < prompt_specs.size(); ++i) {
      if (prompt_specs[i].name == name) return prompt[i];
    }
    throw std::logic_error("no prompt input " + name);
  };
  auto g = std::make_unique<modec_generation>();
  g->s = s;
  const ffi::Tensor& ids = by_name(gen.tokens);
  g->batch = ids.shape()[0];
  const int64_t seq = ids.shape()[1];
  if (!gen.attention_mask.empty()) {
    const ffi::Tensor& mask = by_name(gen.attention_mask);
    if (mask.shape()[0] != g->batch || mask.shape()[1] != seq) {
      Fail(MODEC_ERR_INPUT, "input '" + gen.attention_mask + "' is [" + std::to_string(mask.shape()[0]) + ", " +
                                std::to_string(mask.shape()[1]) + "], '" + gen.tokens + "' [" +
                                std::to_string(g->batch) + ", " + std::to_string(seq) +
                                "]: a prompt's mask covers its tokens (the cache starts empty)");
    }
    // The caller's host copy (TakeInputs checked it): the tensor may be on a GPU.
    const int64_t* m = nullptr;
    for (const modec_tensor& t : given) {
      if (t.name != nullptr && gen.attention_mask == t.name) m = static_cast<const int64_t*>(t.data);
    }
    g->mask.assign(m, m + g->batch * seq);
  }
  // main's inputs in order: the prompt's, and an empty cache [batch, heads, 0, head dim].
  std::vector<ffi::Tensor> args;
  size_t next = 0;
  for (const Spec& sp : s->inputs) {
    if (!artifact::IsPast(sp.name)) {
      args.push_back(prompt[next++]);
      continue;
    }
    std::vector<int64_t> shape = {g->batch, sp.shape[1], 0, sp.shape[3]};
    if ((sp.shape[0] >= 0 && sp.shape[0] != g->batch) || sp.shape[1] < 0 || sp.shape[3] < 0) {
      Fail(MODEC_ERR_INPUT, "cache input '" + sp.name + "' is not [batch, heads, past, head dim] with static heads " +
                                "and head dim for a batch of " + std::to_string(g->batch) + "; rebuild the artifact");
    }
    if (sp.shape[0] < 0) {
      auto it = sym.emplace(sp.symbol[0], g->batch).first;
      if (it->second != g->batch) {
        Fail(MODEC_ERR_INPUT, "the cache's batch dim (" + sp.symbol[0] + ") is " + std::to_string(g->batch) +
                                  " but an input has " + std::to_string(it->second));
      }
    }
    args.push_back(Upload(ffi::ShapeView(shape.data(), shape.size()), ToDL(sp.dtype->code), nullptr, 0, s->dev));
  }
  for (const Spec& sp : gen.decode_inputs) {
    const bool step = sp.name == gen.tokens || sp.name == gen.attention_mask || sp.name == gen.position_ids;
    if (!step && !artifact::IsPast(sp.name)) g->prompt.emplace(sp.name, by_name(sp.name));
  }
  Absorb(g.get(), Outputs(s, Call(s, *s->main, args, "prefill (model run)")), seq, seq);
  return g;
}

void DecodeStep(modec_generation* g, const int64_t* tokens, size_t batch) {
  const modec_session* s = g->s;
  const artifact::Generation& gen = s->generation;
  if (static_cast<int64_t>(batch) != g->batch) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_decode_step: " + std::to_string(batch) + " tokens, the generation has " +
                                         std::to_string(g->batch) + " rows");
  }
  const int64_t total = g->total + 1;
  // In place: room for the new position (doubling, so that a caller stepping on its own
  // copies the cache O(log n) times; modec_generate reserves all it needs at once).
  if (gen.cache_in_place && total > g->capacity) Reserve(g, std::max(total, 2 * g->capacity));
  std::vector<int64_t> mask;
  if (!gen.attention_mask.empty()) {
    mask.resize(static_cast<size_t>(g->batch * total));
    for (int64_t b = 0; b < g->batch; ++b) {
      std::copy(g->mask.begin() + b * g->total, g->mask.begin() + (b + 1) * g->total, mask.begin() + b * total);
      mask[b * total + total - 1] = 1;
    }
  }
  std::vector<ffi::Tensor> args;
  for (const Spec& sp : gen.decode_inputs) {
    if (sp.name == gen.tokens) {
      args.push_back(HostTensor({g->batch, 1}, tokens, s->dev));
    } else if (sp.name == gen.attention_mask) {
      args.push_back(HostTensor({g->batch, total}, mask.data(), s->dev));
    } else if (sp.name == gen.position_ids) {
      // cumsum(attention_mask) - 1 at the last column, clamped at 0 (all ones without a mask).
      std::vector<int64_t> pos(static_cast<size_t>(g->batch), total - 1);
      for (int64_t b = 0; b < g->batch && !mask.empty(); ++b) {
        int64_t sum = 0;
        for (int64_t j = 0; j < total; ++j) sum += mask[b * total + j];
        pos[b] = std::max<int64_t>(sum - 1, 0);
      }
      args.push_back(HostTensor({g->batch, 1}, pos.data(), s->dev));
    } else if (artifact::IsPast(sp.name)) {
      size_t k = 0;  // ParseGeneration: every past input is in the cache list
      while (k + 1 < gen.cache.size() && gen.cache[k].past != sp.name) ++k;
      args.push_back(g->cache[k]);
    } else {
      args.push_back(g->prompt.at(sp.name));
    }
  }
  const std::string what = "decode step (" + gen.decode_entry + ")";
  if (gen.cache_in_place) {  // the cache's buffers, then the positions they hold: [P]
    const ffi::Shape length({g->total});
    Absorb(g, Outputs(s, Call(s, *s->decode, args, what, &length)), total, g->capacity);
  } else {
    Absorb(g, Outputs(s, Call(s, *s->decode, args, what)), total, total);
  }
  g->mask = std::move(mask);
}

// ---- picking tokens ------------------------------------------------------------------------

/*! \brief SplitMix64 (Steele, Lea, Flood 2014; the constants of Vigna's splitmix64.c): the
 * next uniform double in [0, 1) from its 53 high bits. */
double Uniform(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

bool Greedy(const modec_generation_config& c) { return c.temperature == 0.0 || c.top_k == 1; }

/*! \brief The id of the largest logit, the lowest id on ties. */
int64_t Argmax(const float* x, size_t vocab) {
  size_t best = 0;
  for (size_t j = 1; j < vocab; ++j) {
    if (x[j] > x[best]) best = j;
  }
  return static_cast<int64_t>(best);
}

/*! \brief One sampled token of one row, in float64, with the uniform draw `u`
 * (docs/generation.md, "Picking a token"). */
int64_t SampleRow(const float* x, size_t vocab, const modec_generation_config& c, double u, std::vector<double>* z,
                  std::vector<int64_t>* order, std::vector<double>* cum) {
  z->resize(vocab);
  order->resize(vocab);
  for (size_t j = 0; j < vocab; ++j) {
    (*z)[j] = static_cast<double>(x[j]) / c.temperature;
    (*order)[j] = static_cast<int64_t>(j);
  }
  auto before = [&](int64_t a, int64_t b) { return (*z)[a] > (*z)[b] || ((*z)[a] == (*z)[b] && a < b); };
  size_t keep = c.top_k > 0 && static_cast<size_t>(c.top_k) < vocab ? static_cast<size_t>(c.top_k) : vocab;
  std::partial_sort(order->begin(), order->begin() + keep, order->end(), before);
  const double zmax = (*z)[(*order)[0]];
  cum->resize(keep);
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    acc += std::exp((*z)[(*order)[i]] - zmax);
    (*cum)[i] = acc;
  }
  if (c.top_p < 1.0) {
    const double cut = c.top_p * acc;
    size_t n = 0;
    while (n + 1 < keep && (*cum)[n] < cut) ++n;
    keep = n + 1;
  }
  const double target = u * (*cum)[keep - 1];
  for (size_t i = 0; i < keep; ++i) {
    if ((*cum)[i] > target) return (*order)[i];
  }
  return (*order)[keep - 1];
}

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

void CheckConfig(const modec_generation_config* c) {
  if (c == nullptr) Fail(MODEC_ERR_INVALID_ARGUMENT, "the generation config is NULL");
  if (c->max_new_tokens < 0) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "max_new_tokens is " + std::to_string(c->max_new_tokens) + " (must be >= 0)");
  }
  if (!(c->temperature >= 0.0) || std::isinf(c->temperature)) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "temperature is " + Num(c->temperature) +
                                         " (must be >= 0 and finite; 0 is greedy)");
  }
  if (c->top_k < 0) Fail(MODEC_ERR_INVALID_ARGUMENT, "top_k is " + std::to_string(c->top_k) + " (must be >= 0)");
  if (!(c->top_p > 0.0 && c->top_p <= 1.0)) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "top_p is " + Num(c->top_p) + " (must be in (0, 1])");
  }
  if (c->n_stop_tokens > 0 && c->stop_tokens == nullptr) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "stop_tokens is NULL but n_stop_tokens is " + std::to_string(c->n_stop_tokens));
  }
}

/*! \brief One token per row not finished (finished may be NULL), one draw per such row in row
 * order when sampling; finished rows keep their tokens[b]. */
void Pick(const float* logits, size_t batch, size_t vocab, const modec_generation_config& c, uint64_t* state,
          const uint8_t* finished, int64_t* tokens) {
  std::vector<double> z, cum;
  std::vector<int64_t> order;
  for (size_t b = 0; b < batch; ++b) {
    if (finished != nullptr && finished[b]) continue;
    const float* row = logits + b * vocab;
    for (size_t j = 0; j < vocab; ++j) {
      if (std::isnan(row[j])) {
        Fail(MODEC_ERR_RUNTIME, "the logits of row " + std::to_string(b) + " hold NaN (id " + std::to_string(j) +
                                    "): the model's output is broken, no token can be picked");
      }
    }
    tokens[b] = Greedy(c) ? Argmax(row, vocab) : SampleRow(row, vocab, c, Uniform(state), &z, &order, &cum);
  }
}

/*! \brief The loop of docs/generation.md from a prefilled (or already stepped) generation:
 * pick, stream, decode, until every row stopped or the callback says stop. */
void GenerateFrom(modec_generation* g, const modec_generation_config& c, modec_token_callback cb, void* user,
                  int64_t* out_tokens, int32_t* out_lengths) {
  CheckConfig(&c);
  const size_t batch = static_cast<size_t>(g->batch), max_new = static_cast<size_t>(c.max_new_tokens);
  if (out_tokens != nullptr) std::fill(out_tokens, out_tokens + batch * max_new, int64_t{-1});
  std::vector<int32_t> lengths(batch, 0);
  std::vector<uint8_t> finished(batch, max_new == 0);
  std::vector<int64_t> tokens(batch, 0);
  uint64_t state = c.seed;
  // Every decode step this loop may run (one per token but the last), in one allocation.
  if (g->s->generation.cache_in_place && max_new > 1) Reserve(g, g->total + static_cast<int64_t>(max_new) - 1);
  for (size_t step = 0; step < max_new; ++step) {
    Pick(g->logits.data(), batch, static_cast<size_t>(g->vocab), c, &state, finished.data(), tokens.data());
    bool all = true;
    for (size_t b = 0; b < batch; ++b) {
      if (!finished[b]) {
        if (out_tokens != nullptr) out_tokens[b * max_new + lengths[b]] = tokens[b];
        ++lengths[b];
        bool stop = static_cast<size_t>(lengths[b]) == max_new;
        for (size_t k = 0; k < c.n_stop_tokens; ++k) stop = stop || tokens[b] == c.stop_tokens[k];
        finished[b] = stop;
      }
      all = all && finished[b];
    }
    if (cb != nullptr) {
      int halt = 0;
      try {
        halt = cb(user, step, tokens.data(), finished.data(), batch);
      } catch (...) {  // a C++ callback must not throw through the C API; say so, do not crash
        Fail(MODEC_ERR_INVALID_ARGUMENT, "the token callback threw an exception at step " + std::to_string(step));
      }
      if (halt != 0) break;
    }
    if (all) break;
    DecodeStep(g, tokens.data(), batch);
  }
  if (out_lengths != nullptr) std::copy(lengths.begin(), lengths.end(), out_lengths);
}

template <typename F>
modec_status Guard(F&& f) {
  try {
    f();
    g_last_error.clear();
    return MODEC_OK;
  } catch (const Failure& e) {
    g_last_error = artifact::OneLine(e.message);
    return e.status;
  } catch (const ffi::Error& e) {
    g_last_error = artifact::OneLine("TVM error: " + e.kind() + ": " + e.message());
    return MODEC_ERR_RUNTIME;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return MODEC_ERR_RUNTIME;
  } catch (const std::exception& e) {
    g_last_error = artifact::OneLine(std::string("internal error: ") + e.what());
    return MODEC_ERR_RUNTIME;
  } catch (...) {
    g_last_error = "internal error: unknown exception";
    return MODEC_ERR_RUNTIME;
  }
}

}  // namespace
}  // namespace modec

extern "C" {

modec_status modec_open(const char* dir, const char* device, modec_session** out) {
  return modec::Guard([&] {
    if (dir == nullptr || out == nullptr) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_open: dir and out must not be NULL");
    *out = nullptr;
    std::string dev = device ? device : "cpu";
    if (dev != "cpu" && dev != "cuda") modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "device '" + dev + "' is not 'cpu' or 'cuda'");
    modec::DefaultThreads();
    auto s = std::make_unique<modec_session>();
    s->dir = dir;
    modec::Open(s.get(), dev);
    *out = s.release();
  });
}

size_t modec_num_inputs(const modec_session* s) { return s ? s->inputs.size() : 0; }
size_t modec_num_outputs(const modec_session* s) { return s ? s->outputs.size() : 0; }

modec_status modec_input_info(const modec_session* s, size_t i, modec_tensor* info) {
  return modec::Guard([&] {
    if (!s || !info) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_input_info: NULL session or info");
    if (i >= s->inputs.size()) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_input_info: index " + std::to_string(i) +
                                                  " out of range, the model has " +
                                                  std::to_string(s->inputs.size()) + " inputs");
    }
    modec::FillInfo(s->inputs[i], info);
  });
}

modec_status modec_output_info(const modec_session* s, size_t i, modec_tensor* info) {
  return modec::Guard([&] {
    if (!s || !info) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_output_info: NULL session or info");
    if (i >= s->outputs.size()) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_output_info: index " + std::to_string(i) +
                                                  " out of range, the model has " +
                                                  std::to_string(s->outputs.size()) + " outputs");
    }
    modec::FillInfo(s->outputs[i], info);
  });
}

modec_status modec_run(modec_session* s, const modec_tensor* inputs, size_t n_inputs, modec_tensor* outputs,
                       size_t* n_outputs) {
  return modec::Guard([&] {
    if (!s || (!inputs && n_inputs) || !outputs || !n_outputs) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_run: NULL argument");
    }
    modec::Run(s, inputs, n_inputs, outputs, n_outputs);
  });
}

void modec_generation_config_default(modec_generation_config* c) {
  if (c == nullptr) return;
  *c = modec_generation_config{};
  c->max_new_tokens = 32;
  c->temperature = 0.0;
  c->top_k = 0;
  c->top_p = 1.0;
  c->seed = 0;
}

modec_status modec_prefill(modec_session* s, const modec_tensor* inputs, size_t n_inputs, modec_generation** out) {
  return modec::Guard([&] {
    if (out != nullptr) *out = nullptr;
    if (!s || (!inputs && n_inputs) || !out) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_prefill: NULL argument");
    *out = modec::Prefill(s, inputs, n_inputs).release();
  });
}

modec_status modec_decode_step(modec_generation* g, const int64_t* tokens, size_t batch) {
  return modec::Guard([&] {
    if (!g || !tokens) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_decode_step: NULL argument");
    modec::DecodeStep(g, tokens, batch);
  });
}

modec_status modec_generation_logits(const modec_generation* g, const float** logits, size_t* batch, size_t* vocab) {
  return modec::Guard([&] {
    if (!g || !logits || !batch || !vocab) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_generation_logits: NULL argument");
    }
    *logits = g->logits.data();
    *batch = static_cast<size_t>(g->batch);
    *vocab = static_cast<size_t>(g->vocab);
  });
}

size_t modec_generation_cache_length(const modec_generation* g) { return g ? static_cast<size_t>(g->total) : 0; }

void modec_generation_free(modec_generation* g) {
  try {
    delete g;
  } catch (...) {  // a destructor must not throw across the C boundary
  }
}

modec_status modec_pick_tokens(const float* logits, size_t batch, size_t vocab, const modec_generation_config* config,
                               uint64_t* rng_state, const uint8_t* finished, int64_t* tokens) {
  return modec::Guard([&] {
    if ((!logits && batch) || !config || !rng_state || (!tokens && batch)) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_pick_tokens: NULL argument");
    }
    if (vocab == 0) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_pick_tokens: vocab is 0");
    modec::CheckConfig(config);
    modec::Pick(logits, batch, vocab, *config, rng_state, finished, tokens);
  });
}

modec_status modec_generate(modec_session* s, const modec_tensor* inputs, size_t n_inputs,
                            const modec_generation_config* config, modec_token_callback callback, void* user,
                            int64_t* out_tokens, int32_t* out_lengths) {
  return modec::Guard([&] {
    if (!s || (!inputs && n_inputs) || !config) {
      modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_generate: NULL argument");
    }
    modec::CheckConfig(config);  // before the prefill's work
    std::unique_ptr<modec_generation> g = modec::Prefill(s, inputs, n_inputs);
    modec::GenerateFrom(g.get(), *config, callback, user, out_tokens, out_lengths);
  });
}

modec_status modec_generate_from(modec_generation* g, const modec_generation_config* config,
                                 modec_token_callback callback, void* user, int64_t* out_tokens,
                                 int32_t* out_lengths) {
  return modec::Guard([&] {
    if (!g || !config) modec::Fail(MODEC_ERR_INVALID_ARGUMENT, "modec_generate_from: NULL argument");
    modec::GenerateFrom(g, *config, callback, user, out_tokens, out_lengths);
  });
}

void modec_close(modec_session* s) {
  try {
    delete s;
  } catch (...) {  // a destructor must not throw across the C boundary
  }
}

const char* modec_last_error(void) { return modec::g_last_error.c_str(); }

const char* modec_status_name(modec_status st) {
  switch (st) {
    case MODEC_OK: return "MODEC_OK";
    case MODEC_ERR_INVALID_ARGUMENT: return "MODEC_ERR_INVALID_ARGUMENT";
    case MODEC_ERR_IO: return "MODEC_ERR_IO";
    case MODEC_ERR_MANIFEST: return "MODEC_ERR_MANIFEST";
    case MODEC_ERR_CHECKSUM: return "MODEC_ERR_CHECKSUM";
    case MODEC_ERR_TARGET: return "MODEC_ERR_TARGET";
    case MODEC_ERR_WEIGHTS: return "MODEC_ERR_WEIGHTS";
    case MODEC_ERR_INPUT: return "MODEC_ERR_INPUT";
    case MODEC_ERR_RUNTIME: return "MODEC_ERR_RUNTIME";
  }
  return "MODEC_ERR_UNKNOWN";
}

size_t modec_dtype_size(modec_dtype dt) {
  const modec::DtypeInfo* d = modec::ByCode(dt);
  return d ? d->size : 0;
}

}  // extern "C"
