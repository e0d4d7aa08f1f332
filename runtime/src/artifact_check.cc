#include "artifact_check.h"

#include <limits>

#include "json.h"

namespace modec {
namespace artifact {

void Fail(modec_status st, const std::string& msg) { throw Failure{st, msg}; }

namespace {

const std::vector<DtypeInfo> kDtypes = {
    {"float32", "F32", MODEC_FLOAT32, 4}, {"float16", "F16", MODEC_FLOAT16, 2},
    {"float64", "F64", MODEC_FLOAT64, 8}, {"int64", "I64", MODEC_INT64, 8},
    {"int32", "I32", MODEC_INT32, 4},     {"int8", "I8", MODEC_INT8, 1},
    {"uint8", "U8", MODEC_UINT8, 1},      {"bool", "BOOL", MODEC_BOOL, 1},
    {"uint32", "U32", MODEC_UINT32, 4},   {"uint16", "U16", MODEC_UINT16, 2},
    {"int16", "I16", MODEC_INT16, 2},     {"uint64", "U64", MODEC_UINT64, 8},
    {"bfloat16", "BF16", MODEC_BFLOAT16, 2},
};

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

const Spec* Find(const std::vector<Spec>& specs, const std::string& name) {
  for (const Spec& s : specs) {
    if (s.name == name) return &s;
  }
  return nullptr;
}


/*! \brief sections.generation, in two tiers.
 *
 * Its structure (the fields, their JSON types, every name one of the model's inputs or
 * outputs, a non-empty cache) is what the Python runtime checks when it loads an artifact:
 * a failure throws (JsonError, or Failure(MODEC_ERR_MANIFEST) naming the field), and
 * modec_open refuses the artifact. What generation further needs of the model (cache inputs of
 * rank 4 named past_key_values.{i}.*, int64 [batch, seq] token / mask / position inputs,
 * float32 [batch, seq, vocab] logits, a decode entry that takes the step inputs and the cache)
 * sets *unusable instead: the artifact still opens and runs, and the generation calls refuse
 * it with that reason. */
Generation ParseGeneration(const Json& g, const Manifest& m, std::string* unusable) {
  Generation out;
  std::vector<std::string> unknown;
  auto check = [&](const std::vector<Spec>& specs, const std::string& name) -> const Spec* {
    const Spec* sp = Find(specs, name);
    if (sp == nullptr) unknown.push_back(name);
    return sp;
  };
  // An input's name, or "" where the section says null (`nullable` fields only).
  auto input = [&](const Json& v, bool nullable) -> std::string {
    if (nullable && v.is(Json::kNull)) return "";
    check(m.inputs, v.str());
    return v.str();
  };
  for (const Json& c : g.at("cache").array()) {
    CacheSpec e{input(c.at("past"), false), c.at("present").str()};
    check(m.outputs, e.present);
    out.cache.push_back(std::move(e));
  }
  out.tokens = input(g.at("tokens"), false);
  out.attention_mask = input(g.at("attention_mask"), true);
  out.position_ids = input(g.at("position_ids"), true);
  out.logits = g.at("logits").str();
  const Spec* logits = check(m.outputs, out.logits);
  for (const Json& j : g.at("prompt_only").array()) input(j, false);
  const Json& decode = g.at("decode");
  out.decode_entry = decode.at("entry").str();
  for (const Json& j : decode.at("inputs").array()) out.decode_inputs.push_back(ParseSpec(j, "decode input"));
  if (const Json* in_place = decode.find("cache_in_place")) out.cache_in_place = in_place->boolean();
  if (!unknown.empty() || out.cache.empty()) {
    Fail(MODEC_ERR_MANIFEST, unknown.empty() ? "the cache list is empty"
                                             : "'" + unknown.front() + "' is not an input or output of the model");
  }

  auto refuse = [&](const std::string& why) {
    if (unusable->empty()) *unusable = why;
  };
  for (size_t k = 0; k < out.cache.size(); ++k) {
    const CacheSpec& e = out.cache[k];
    const Spec* past = Find(m.inputs, e.past);
    const Spec* present = Find(m.outputs, e.present);
    if (!IsPast(e.past) || past->shape.size() != 4) {
      refuse("cache input '" + e.past + "' is not a past_key_values.{i}.key|value input of rank 4");
    } else if (present->shape.size() != 4 || present->dtype != past->dtype) {
      refuse("cache output '" + e.present + "' is not shaped like '" + e.past + "'");
    }
    for (size_t j = 0; j < k; ++j) {
      if (out.cache[j].past == e.past || out.cache[j].present == e.present) refuse("cache '" + e.past + "' twice");
    }
  }
  for (const Spec& sp : m.inputs) {
    bool listed = false;
    for (const CacheSpec& e : out.cache) listed = listed || e.past == sp.name;
    if (IsPast(sp.name) && !listed) refuse("cache input '" + sp.name + "' is not in the cache list");
  }
  for (const std::string* name : {&out.tokens, &out.attention_mask, &out.position_ids}) {
    const Spec* sp = name->empty() ? nullptr : Find(m.inputs, *name);
    if (sp != nullptr && (sp->dtype->code != MODEC_INT64 || sp->shape.size() != 2)) {
      refuse(name == &out.tokens ? "the token input '" + *name + "' is not int64 [batch, seq] (generation feeds ids)"
                                 : "input '" + *name + "' is not int64 [batch, seq]");
    }
  }
  if (logits->dtype->code != MODEC_FLOAT32 || logits->shape.size() != 3) {
    refuse("logits '" + out.logits + "' is not a float32 [batch, seq, vocab] output");
  }
  for (size_t k = 0; k < out.decode_inputs.size(); ++k) {
    const Spec& sp = out.decode_inputs[k];
    const Spec* main = Find(m.inputs, sp.name);
    // Every decode input is one of main's (the step inputs, the cache, or the prompt's,
    // which a step feeds again), with main's dtype and rank.
    if (main == nullptr || main->dtype != sp.dtype || main->shape.size() != sp.shape.size()) {
      refuse("decode input '" + sp.name + "' is not an input of main with its dtype and rank");
    }
    for (size_t j = 0; j < k; ++j) {
      if (out.decode_inputs[j].name == sp.name) refuse("decode input '" + sp.name + "' twice");
    }
  }
  std::vector<std::string> step = {out.tokens, out.attention_mask, out.position_ids};
  for (const CacheSpec& e : out.cache) step.push_back(e.past);
  for (const std::string& name : step) {
    if (!name.empty() && Find(out.decode_inputs, name) == nullptr) {
      refuse("the decode entry '" + out.decode_entry + "' does not take '" + name + "'");
    }
  }
  return out;
}

/*! \brief target.archs of a CUDA artifact: a non-empty list of IsCudaArch names. An artifact
 * without it was written before model.so carried compiled kernels (its CUDA source needs a
 * compiler at load time, which this runtime does not have). */
std::vector<std::string> ParseArchs(const Json& target, const std::string& path) {
  const std::string rebuild = "; rebuild it with `modec compile ... --target cuda`";
  const Json* archs = target.find("archs");
  if (archs == nullptr) {
    Fail(MODEC_ERR_MANIFEST, path + ": the CUDA target has no 'archs': the artifact predates compiled CUDA kernels" +
                                 rebuild);
  }
  std::vector<std::string> out;
  if (archs->is(Json::kArray)) {
    for (const Json& a : archs->array()) {
      if (!a.is(Json::kString) || !IsCudaArch(a.str())) {
        out.clear();
        break;
      }
      out.push_back(a.str());
    }
  }
  if (out.empty()) {
    Fail(MODEC_ERR_MANIFEST, path + ": target.archs is malformed (not a non-empty list of names like 'sm_90')" +
                                 rebuild);
  }
  return out;
}

/*! \brief (major, minor, arch-specific) of an IsCudaArch name; false for anything else. */
bool SplitCudaArch(const std::string& arch, int* major, int* minor, bool* specific) {
  const std::string prefix = "sm_";
  if (arch.compare(0, prefix.size(), prefix) != 0) return false;
  size_t end = arch.size();
  *specific = end > prefix.size() && arch[end - 1] == 'a';
  if (*specific) --end;
  const size_t digits = end - prefix.size();
  // sm_50 .. sm_1210, no leading zero (one spelling per architecture)
  if (digits < 2 || digits > 4 || arch[prefix.size()] == '0') return false;
  int value = 0;
  for (size_t i = prefix.size(); i < end; ++i) {
    if (arch[i] < '0' || arch[i] > '9') return false;
    value = value * 10 + (arch[i] - '0');
  }
  *major = value / 10;
  *minor = value % 10;
  return true;
}

}  // namespace

bool IsCudaArch(const std::string& arch) {
  int major = 0, minor = 0;
  bool specific = false;
  return SplitCudaArch(arch, &major, &minor, &specific);
}

std::string CudaArchOf(const std::string& compute_version) {
  const size_t dot = compute_version.find('.');
  if (dot == std::string::npos || dot == 0 || dot > 3 || compute_version.size() != dot + 2) return "";
  std::string arch = "sm_" + compute_version.substr(0, dot) + compute_version.substr(dot + 1);
  return IsCudaArch(arch) ? arch : "";
}

bool CudaArchRuns(const std::string& sass, const std::string& device) {
  int sm = 0, sn = 0, dm = 0, dn = 0;
  bool s_specific = false, d_specific = false;
  if (!SplitCudaArch(sass, &sm, &sn, &s_specific) || !SplitCudaArch(device, &dm, &dn, &d_specific)) return false;
  if (d_specific) return false;  // a device is never arch-specific: not a device name
  if (s_specific) return sm == dm && sn == dn;
  return sm == dm && sn <= dn;
}

std::string CudaArchRefusal(const std::vector<std::string>& archs, const std::string& device, const std::string& gpu) {
  std::string list;
  for (const std::string& a : archs) {
    if (CudaArchRuns(a, device)) return "";
    list += (list.empty() ? "" : ", ") + a;
  }
  return "artifact built for CUDA archs " + list + "; this GPU (" + gpu + ") is " + device +
         ": rebuild with --target '{\"kind\": \"cuda\", \"arch\": \"" + device + "\"}'";
}

const std::vector<DtypeInfo>& Dtypes() { return kDtypes; }

bool IsPast(const std::string& name) {
  const std::string prefix = "past_key_values.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size(), digits = 0;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i, ++digits;
  if (digits == 0 || i >= name.size() || name[i] != '.') return false;
  const std::string kind = name.substr(i + 1);
  return kind == "key" || kind == "value";
}

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

bool NumElements(const std::vector<int64_t>& shape, int64_t* out) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  *out = n;
  return true;
}

Manifest ParseManifest(const std::string& text, const std::string& path, const std::string& host_machine) {
  Manifest out;
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
    if (const Json* e = m.find("entry")) out.entry = e->str();
    const Json& target = m.at("target");
    out.device = target.at("device").str();
    const Json* machine = target.find("machine");
    // A CUDA artifact's model.so holds host code too: its machine, when given, must be this one.
    const bool host_code = out.device == "cpu" || (out.device == "cuda" && machine != nullptr);
    if (host_code && (machine == nullptr || machine->str() != host_machine)) {
      Fail(MODEC_ERR_TARGET, "artifact built for CPU architecture '" +
                                 (machine ? machine->str() : std::string("?")) + "', this host is '" +
                                 host_machine + "': rebuild it for this machine");
    }
    if (out.device == "cuda") out.archs = ParseArchs(target, path);
    for (const Json& j : m.at("inputs").array()) out.inputs.push_back(ParseSpec(j, "input"));
    for (const Json& j : m.at("outputs").array()) out.outputs.push_back(ParseSpec(j, "output"));
    for (const Json& j : m.at("params").array()) {
      out.params.push_back(ParseSpec(j, "param"));
      for (int64_t d : out.params.back().shape) {
        if (d < 0) Fail(MODEC_ERR_MANIFEST, path + ": param '" + out.params.back().name + "' has a symbolic dim");
      }
    }
    for (const auto& kv : m.at("files").object()) {
      out.files[kv.first] = {kv.second.at("sha256").str(), kv.second.at("bytes").i64()};
    }
    const Json* sections = m.find("sections");
    const Json* gen = sections != nullptr && sections->is(Json::kObject) ? sections->find("generation") : nullptr;
    if (gen != nullptr && !gen->is(Json::kNull)) {
      out.has_generation = true;
      try {
        out.generation = ParseGeneration(*gen, out, &out.generation_error);
      } catch (const JsonError& e) {
        Fail(MODEC_ERR_MANIFEST, path + ": sections.generation is malformed (" + e.what() + "); rebuild the artifact");
      } catch (const Failure& f) {
        Fail(MODEC_ERR_MANIFEST, path + ": sections.generation is malformed (" + f.message + "); rebuild the artifact");
      }
    }
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_MANIFEST, path + ": malformed field (" + e.what() + "); rebuild the artifact");
  }
  for (const char* need : {"model.so", "weights.safetensors"}) {
    if (!out.files.count(need)) Fail(MODEC_ERR_MANIFEST, path + " lists no " + need);
  }
  return out;
}

void CheckFileName(const std::string& name) {
  bool plain = !name.empty() && name[0] != '.';
  for (char c : name) {
    // '/' makes a path; '\\' is refused too (the Python runtime does); a control character
    // (NUL above all: the C path would end there) is no name anyone meant.
    if (c == '/' || c == '\\' || static_cast<unsigned char>(c) < 0x20 || c == 0x7f) plain = false;
  }
  if (!plain) Fail(MODEC_ERR_MANIFEST, "manifest file name '" + name + "' is not a plain file name");
}

std::vector<Slice> CheckSafetensors(const std::string& data, const std::vector<Spec>& params,
                                    const std::string& path) {
  return CheckSafetensors(data.data(), data.size(), params, path);
}

std::vector<Slice> CheckSafetensors(const char* data, size_t size, const std::vector<Spec>& params,
                                    const std::string& path) {
  if (size < 8) Fail(MODEC_ERR_WEIGHTS, path + " is too short for a safetensors file");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(data[i]);
  if (n > kMaxHeader || 8 + n > size) Fail(MODEC_ERR_WEIGHTS, path + ": header length out of range");
  Json header;
  try {
    header = Json::Parse(std::string(data + 8, static_cast<size_t>(n)));
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_WEIGHTS, path + ": header is not valid JSON (" + e.what() + ")");
  }
  const size_t base = 8 + n;
  const size_t body = size - base;
  std::vector<Slice> slices;
  try {
    for (const Spec& p : params) {
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
      int64_t numel = 0;
      if (!NumElements(shape, &numel) ||
          static_cast<uint64_t>(numel) > std::numeric_limits<size_t>::max() / p.dtype->size) {
        Fail(MODEC_ERR_WEIGHTS, path + ": tensor '" + p.name + "' shape is too large (its byte size overflows)");
      }
      if (b < 0 || e < b || static_cast<size_t>(e) > body ||
          static_cast<size_t>(e - b) != static_cast<size_t>(numel) * p.dtype->size) {
        Fail(MODEC_ERR_WEIGHTS, path + ": data_offsets of '" + p.name + "' out of range");
      }
      slices.push_back(Slice{base + static_cast<size_t>(b), static_cast<size_t>(e - b)});
    }
  } catch (const JsonError& e) {
    Fail(MODEC_ERR_WEIGHTS, path + ": malformed header (" + e.what() + ")");
  }
  return slices;
}

namespace {

uint64_t Le(const std::string& d, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(d[at + i]);
  return v;
}

/*! \brief Whether [offset, offset + count * size) lies in a file of `file` bytes. */
bool InFile(uint64_t offset, uint64_t count, uint64_t size, uint64_t file, uint64_t* end) {
  uint64_t len = 0;
  if (__builtin_mul_overflow(count, size, &len) || __builtin_add_overflow(offset, len, end)) return false;
  return *end <= file;
}

}  // namespace

void CheckLibrary(const std::string& data, const std::string& path) {
  // ELF64 header: e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff @32, e_shoff @40,
  // e_flags, e_ehsize, e_phentsize @54, e_phnum @56, e_shentsize @58, e_shnum @60.
  constexpr size_t kEhdr = 64, kPhdr = 56;
  if (data.size() < kEhdr || data.compare(0, 4, "\x7f" "ELF") != 0 || data[4] != 2 || data[5] != 1) return;
  const uint64_t file = data.size();
  const uint64_t phoff = Le(data, 32, 8), shoff = Le(data, 40, 8);
  const uint64_t phentsize = Le(data, 54, 2), phnum = Le(data, 56, 2);
  const uint64_t shentsize = Le(data, 58, 2), shnum = Le(data, 60, 2);
  auto truncated = [&](const std::string& what, uint64_t end) {
    Fail(MODEC_ERR_RUNTIME, "TVM cannot load model.so: " + path + " is truncated (" + what + " ends at byte " +
                                std::to_string(end) + ", the file has " + std::to_string(file) +
                                "); rebuild the artifact");
  };
  uint64_t end = 0;
  if (phentsize < kPhdr) return;  // dlopen refuses a foreign program header size itself
  if (!InFile(phoff, phnum, phentsize, file, &end)) truncated("the program header table", end);
  for (uint64_t i = 0; i < phnum; ++i) {
    const size_t ph = static_cast<size_t>(phoff + i * phentsize);
    const uint64_t offset = Le(data, ph + 8, 8), filesz = Le(data, ph + 32, 8);
    if (filesz > 0 && !InFile(offset, 1, filesz, file, &end)) truncated("segment " + std::to_string(i), end);
  }
  if (shnum > 0 && !InFile(shoff, shnum, shentsize, file, &end)) truncated("the section header table", end);
}

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

}  // namespace artifact
}  // namespace modec
