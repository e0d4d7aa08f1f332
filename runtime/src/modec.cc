// The modec C API on top of the TVM runtime (tvm_ffi headers only, see DESIGN.md).
#include <modec/modec.h>
#include <sys/utsname.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "json.h"
#include "sha256.h"

namespace ffi = tvm::ffi;

namespace modec {
namespace {

constexpr const char* kSchema = "modec.artifact/1";
constexpr uint64_t kMaxHeader = 100u << 20;  // safetensors header cap (same as the format's)

thread_local std::string g_last_error;

/*! \brief A failure with its status; converted to a code at the C boundary. */
struct Failure {
  modec_status status;
  std::string message;
};

[[noreturn]] void Fail(modec_status st, const std::string& msg) { throw Failure{st, msg}; }

struct DtypeInfo {
  const char* numpy;
  const char* safetensors;
  modec_dtype code;
  DLDataType dl;
  size_t size;
};

const DtypeInfo kDtypes[] = {
    {"float32", "F32", MODEC_FLOAT32, {kDLFloat, 32, 1}, 4},
    {"float16", "F16", MODEC_FLOAT16, {kDLFloat, 16, 1}, 2},
    {"float64", "F64", MODEC_FLOAT64, {kDLFloat, 64, 1}, 8},
    {"int64", "I64", MODEC_INT64, {kDLInt, 64, 1}, 8},
    {"int32", "I32", MODEC_INT32, {kDLInt, 32, 1}, 4},
    {"int8", "I8", MODEC_INT8, {kDLInt, 8, 1}, 1},
    {"uint8", "U8", MODEC_UINT8, {kDLUInt, 8, 1}, 1},
    {"bool", "BOOL", MODEC_BOOL, {kDLBool, 8, 1}, 1},
    {"uint32", "U32", MODEC_UINT32, {kDLUInt, 32, 1}, 4},
    {"uint16", "U16", MODEC_UINT16, {kDLUInt, 16, 1}, 2},
    {"int16", "I16", MODEC_INT16, {kDLInt, 16, 1}, 2},
    {"uint64", "U64", MODEC_UINT64, {kDLUInt, 64, 1}, 8},
};

const DtypeInfo* ByNumpy(const std::string& s) {
  for (const auto& d : kDtypes) {
    if (s == d.numpy) return &d;
  }
  return nullptr;
}
const DtypeInfo* ByCode(modec_dtype c) {
  for (const auto& d : kDtypes) {
    if (c == d.code) return &d;
  }
  return nullptr;
}
const DtypeInfo* ByDL(DLDataType t) {
  for (const auto& d : kDtypes) {
    if (t.code == d.dl.code && t.bits == d.dl.bits && t.lanes == d.dl.lanes) return &d;
  }
  return nullptr;
}

struct Spec {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;       // -1 for a symbolic dim
  std::vector<std::string> symbol;  // the symbol's name ("" for static dims)
};

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::string ReadFile(const std::string& path) {
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

Spec ParseSpec(const Json& j, const std::string& where) {
  Spec s;
  s.name = j.at("name").str();
  s.dtype = ByNumpy(j.at("dtype").str());
  if (s.dtype == nullptr) Fail(MODEC_ERR_MANIFEST, where + " '" + s.name + "': unsupported dtype " + j.at("dtype").str());
  for (const Json& d : j.at("shape").array()) {
    if (d.is(Json::kString)) {
      s.shape.push_back(-1);
      s.symbol.push_back(d.str());
    } else {
      int64_t v = d.i64();
      if (v < 0) Fail(MODEC_ERR_MANIFEST, where + " '" + s.name + "': negative dim");
      s.shape.push_back(v);
      s.symbol.emplace_back();
    }
  }
  return s;
}

}  // namespace
}  // namespace modec

struct modec_session {
  std::string dir;
  std::string entry = "main";
  std::vector<modec::Spec> inputs, outputs, params;
  // Non-nullable TVM handles, set by Open(); the library must outlive the VM and the tensors.
  std::optional<ffi::Module> lib;
  std::optional<ffi::Module> vm;
  std::optional<ffi::Function> main;
  std::vector<ffi::Tensor> weights;
  DLDevice dev{kDLCPU, 0};
  // Output storage kept alive until the next run.
  std::vector<ffi::Tensor> last_out;
  std::vector<std::vector<int64_t>> last_shapes;
};

namespace modec {
namespace {

void LoadManifest(modec_session* s, std::map<std::string, std::pair<std::string, int64_t>>* files,
                  std::string* device) {
  std::string path = s->dir + "/manifest.json";
  std::string text = ReadFile(path);
  Json m;
  try {
    m = Json::Parse(text);
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_MANIFEST, path + " is not valid JSON (" + e.what() + "); rebuild the artifact");
  }
  try {
    const Json* schema = m.is(Json::kObject) ? m.find("schema") : nullptr;
    if (schema == nullptr || !schema->is(Json::kString) || schema->str() != kSchema) {
      Fail(MODEC_ERR_MANIFEST, path + ": schema is not '" + std::string(kSchema) +
                                   "'; rebuild the artifact or use a matching runtime");
    }
    if (const Json* e = m.find("entry")) s->entry = e->str();
    const Json& target = m.at("target");
    *device = target.at("device").str();
    const Json* machine = target.find("machine");
    if (*device == "cpu" && (machine == nullptr || machine->str() != HostMachine())) {
      Fail(MODEC_ERR_TARGET, "artifact built for CPU architecture '" +
                                 (machine ? machine->str() : std::string("?")) + "', this host is '" +
                                 HostMachine() + "': rebuild it for this machine");
    }
    for (const Json& j : m.at("inputs").array()) s->inputs.push_back(ParseSpec(j, "input"));
    for (const Json& j : m.at("outputs").array()) s->outputs.push_back(ParseSpec(j, "output"));
    for (const Json& j : m.at("params").array()) {
      s->params.push_back(ParseSpec(j, "param"));
      for (int64_t d : s->params.back().shape) {
        if (d < 0) Fail(MODEC_ERR_MANIFEST, path + ": param '" + s->params.back().name + "' has a symbolic dim");
      }
    }
    for (const auto& kv : m.at("files").object()) {
      (*files)[kv.first] = {kv.second.at("sha256").str(), kv.second.at("bytes").i64()};
    }
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_MANIFEST, path + ": malformed field (" + e.what() + "); rebuild the artifact");
  }
  for (const char* need : {"model.so", "weights.safetensors"}) {
    if (!files->count(need)) Fail(MODEC_ERR_MANIFEST, path + " lists no " + need);
  }
}

/*! \brief Read a listed file and check its size and SHA-256; returns its bytes. */
std::string ReadVerified(const std::string& dir, const std::string& name,
                         const std::pair<std::string, int64_t>& want) {
  if (name.find('/') != std::string::npos || name.empty() || name[0] == '.') {
    Fail(MODEC_ERR_MANIFEST, "manifest file name '" + name + "' is not a plain file name");
  }
  std::string path = dir + "/" + name;
  std::string data = ReadFile(path);
  if (static_cast<int64_t>(data.size()) != want.second) {
    Fail(MODEC_ERR_CHECKSUM, path + " has " + std::to_string(data.size()) + " bytes, the manifest says " +
                                 std::to_string(want.second) + " (truncated or modified); copy the artifact again");
  }
  Sha256 h;
  h.Update(data.data(), data.size());
  std::string got = h.HexDigest();
  if (got != want.first) {
    Fail(MODEC_ERR_CHECKSUM, path + " SHA-256 " + got.substr(0, 12) + "... does not match the manifest (" +
                                 want.first.substr(0, 12) + "...); the file is corrupted, copy the artifact again");
  }
  return data;
}

void LoadWeights(modec_session* s, const std::string& data) {
  const std::string path = s->dir + "/weights.safetensors";
  if (data.size() < 8) Fail(MODEC_ERR_WEIGHTS, path + " is too short for a safetensors file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(data[i]);
  if (n > kMaxHeader || 8 + n > data.size()) Fail(MODEC_ERR_WEIGHTS, path + ": header length out of range");
  Json header;
  try {
    header = Json::Parse(data.substr(8, n));
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_WEIGHTS, path + ": header is not valid JSON (" + e.what() + ")");
  }
  const size_t base = 8 + n;
  const size_t body = data.size() - base;
  try {
    for (const Spec& p : s->params) {
      const Json* t = header.find(p.name);
      if (t == nullptr) Fail(MODEC_ERR_WEIGHTS, path + " has no tensor '" + p.name + "' listed in the manifest");
      std::vector<int64_t> shape;
      for (const Json& d : t->at("shape").array()) shape.push_back(d.i64());
      if (t->at("dtype").str() != p.dtype->safetensors || shape != p.shape) {
        Fail(MODEC_ERR_WEIGHTS, path + ": tensor '" + p.name + "' dtype/shape differ from the manifest");
      }
      const auto& off = t->at("data_offsets").array();
      if (off.size() != 2) Fail(MODEC_ERR_WEIGHTS, path + ": bad data_offsets for '" + p.name + "'");
      int64_t b = off[0].i64(), e = off[1].i64();
      int64_t numel = 1;
      for (int64_t d : shape) numel *= d;
      if (b < 0 || e < b || static_cast<size_t>(e) > body ||
          static_cast<size_t>(e - b) != static_cast<size_t>(numel) * p.dtype->size) {
        Fail(MODEC_ERR_WEIGHTS, path + ": data_offsets of '" + p.name + "' out of range");
      }
      ffi::Tensor w = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                               p.dtype->dl, DLDevice{kDLCPU, 0});
      if (e > b) std::memcpy(w.data_ptr(), data.data() + base + b, e - b);
      s->weights.push_back(w);
    }
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_WEIGHTS, path + ": malformed header (" + e.what() + ")");
  }
}

void Open(modec_session* s, const std::string& device) {
  std::map<std::string, std::pair<std::string, int64_t>> files;
  std::string built_for;
  LoadManifest(s, &files, &built_for);
  if (built_for != device) {
    Fail(MODEC_ERR_TARGET, "artifact built for device '" + built_for + "', this session runs on '" + device +
                               "': rebuild with the matching --target");
  }
  for (const auto& kv : files) {
    if (kv.first != "weights.safetensors") ReadVerified(s->dir, kv.first, kv.second);
  }
  LoadWeights(s, ReadVerified(s->dir, "weights.safetensors", files["weights.safetensors"]));
  try {
    s->lib = ffi::Module::LoadFromFile(s->dir + "/model.so");
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

std::string InputNames(const modec_session* s) {
  std::string names;
  for (const Spec& sp : s->inputs) names += (names.empty() ? "" : ", ") + sp.name;
  return names;
}

void Run(modec_session* s, const modec_tensor* in, size_t n_in, modec_tensor* out, size_t* n_out) {
  if (*n_out < s->outputs.size()) {
    Fail(MODEC_ERR_INVALID_ARGUMENT, "the outputs array holds " + std::to_string(*n_out) + ", the model has " +
                                         std::to_string(s->outputs.size()) + " outputs");
  }
  // Every given input is named, known and given once (then only missing ones remain).
  for (size_t i = 0; i < n_in; ++i) {
    if (in[i].name == nullptr) Fail(MODEC_ERR_INPUT, "input #" + std::to_string(i) + " has no name (NULL)");
    bool known = false;
    for (const Spec& sp : s->inputs) known = known || sp.name == in[i].name;
    if (!known) {
      Fail(MODEC_ERR_INPUT, std::string("unknown input '") + in[i].name + "'; the model's inputs are " +
                                InputNames(s));
    }
    for (size_t j = 0; j < i; ++j) {
      if (std::strcmp(in[j].name, in[i].name) == 0) {
        Fail(MODEC_ERR_INPUT, std::string("input '") + in[i].name + "' given twice");
      }
    }
  }
  std::map<std::string, int64_t> sym;
  std::vector<ffi::Tensor> args;
  for (const Spec& sp : s->inputs) {
    const modec_tensor* t = nullptr;
    for (size_t i = 0; i < n_in; ++i) {
      if (in[i].name != nullptr && sp.name == in[i].name) t = &in[i];
    }
    if (t == nullptr) {
      Fail(MODEC_ERR_INPUT, "missing input '" + sp.name + "'; the model's inputs are " + InputNames(s));
    }
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
    for (int32_t d = 0; d < t->ndim; ++d) {
      int64_t got = t->shape[d];
      if (got <= 0) {
        Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " is " + std::to_string(got) +
                                  " (must be >= 1)");
      }
      if (sp.shape[d] >= 0 && got != sp.shape[d]) {
        Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " is " + std::to_string(got) +
                                  ", expected " + std::to_string(sp.shape[d]));
      }
      if (sp.shape[d] < 0) {
        auto it = sym.emplace(sp.symbol[d], got).first;
        if (it->second != got) {
          Fail(MODEC_ERR_INPUT, "input '" + sp.name + "' dim " + std::to_string(d) + " (" + sp.symbol[d] + ") is " +
                                    std::to_string(got) + " but another input has " + std::to_string(it->second));
        }
      }
    }
    if (t->data == nullptr) Fail(MODEC_ERR_INVALID_ARGUMENT, "input '" + sp.name + "' has no data");
    ffi::Tensor a = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(t->shape, t->ndim), sp.dtype->dl, s->dev);
    std::memcpy(a.data_ptr(), t->data, ffi::GetDataSize(*a.GetDLTensorPtr()));
    args.push_back(a);
  }
  std::vector<ffi::AnyView> views;
  for (const auto& a : args) views.emplace_back(a);
  for (const auto& w : s->weights) views.emplace_back(w);
  ffi::Any ret;
  try {
    s->main->CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
  } catch (const ffi::Error& e) {
    Fail(MODEC_ERR_RUNTIME, std::string("model run failed: ") + e.kind() + ": " + e.message());
  }
  s->last_out.clear();
  if (auto t = ret.try_cast<ffi::Tensor>()) {
    s->last_out.push_back(*t);
  } else if (auto arr = ret.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *arr) {
      auto tt = x.try_cast<ffi::Tensor>();
      if (!tt) Fail(MODEC_ERR_RUNTIME, "the model returned a non-tensor output");
      s->last_out.push_back(*tt);
    }
  } else {
    Fail(MODEC_ERR_RUNTIME, "the model returned neither a tensor nor a tuple");
  }
  if (s->last_out.size() != s->outputs.size()) {
    Fail(MODEC_ERR_RUNTIME, "the model returned " + std::to_string(s->last_out.size()) + " outputs, the manifest lists " +
                                std::to_string(s->outputs.size()));
  }
  s->last_shapes.clear();
  for (size_t i = 0; i < s->last_out.size(); ++i) {
    const ffi::Tensor& t = s->last_out[i];
    const DtypeInfo* dt = ByDL(t.dtype());
    if (dt == nullptr || !t.IsContiguous() || t.device().device_type != kDLCPU) {
      Fail(MODEC_ERR_RUNTIME, "output '" + s->outputs[i].name + "' is not a contiguous host tensor of a known dtype");
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
    s->last_shapes.emplace_back(sh.begin(), sh.end());
    out[i].name = s->outputs[i].name.c_str();
    out[i].dtype = dt->code;
    out[i].ndim = static_cast<int32_t>(sh.size());
    out[i].shape = s->last_shapes.back().data();
    out[i].data = static_cast<const char*>(t.data_ptr()) + t.GetDLTensorPtr()->byte_offset;
  }
  *n_out = s->last_out.size();
}

/*! \brief The header promises a one-line, non-empty message: a path or a TVM message may hold
 * line breaks (a directory named "a\nb"), so each run of control characters becomes one space. */
std::string OneLine(const std::string& msg) {
  std::string out;
  bool gap = false;
  for (char c : msg) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      gap = true;
      continue;
    }
    if (gap && !out.empty()) out += ' ';
    gap = false;
    out += c;
  }
  return out.empty() ? "unknown error" : out;
}

template <typename F>
modec_status Guard(F&& f) {
  try {
    f();
    g_last_error.clear();
    return MODEC_OK;
  } catch (const Failure& e) {
    g_last_error = OneLine(e.message);
    return e.status;
  } catch (const ffi::Error& e) {
    g_last_error = OneLine("TVM error: " + e.kind() + ": " + e.message());
    return MODEC_ERR_RUNTIME;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of memory";
    return MODEC_ERR_RUNTIME;
  } catch (const std::exception& e) {
    g_last_error = OneLine(std::string("internal error: ") + e.what());
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
    if (dev == "cuda") {
      modec::Fail(MODEC_ERR_TARGET, "this runtime build runs CPU artifacts only (device 'cuda' is not supported)");
    }
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
