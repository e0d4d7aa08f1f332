// Unit test of the TVM-free artifact checks (src/artifact_check.cc) that need no artifact and
// no GPU: the CUDA architecture rule modec_open applies to a CUDA artifact's target.archs and
// the GPU it finds, and the manifest's CUDA target fields. Prints one line per check
// ("ok   ..." or "FAIL ..."), then "N passed, M failed"; exits 1 on any failure. Run by ctest and
// by tests/runtime/test_cxx_cuda.py.
#include <cstdio>
#include <string>
#include <vector>

#include "artifact_check.h"

namespace a = modec::artifact;

namespace {

int passed = 0, failed = 0;

void Check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  ++(ok ? passed : failed);
}

/*! \brief A manifest with the given target object (the rest minimal and valid). */
std::string Manifest(const std::string& target) {
  return R"({"schema": "modec.artifact/1", "target": )" + target +
         R"(, "inputs": [], "outputs": [], "params": [], "files": {"model.so": {"sha256": "0", "bytes": 1},
         "weights.safetensors": {"sha256": "0", "bytes": 1}}})";
}

/*! \brief ParseManifest on `target`: the status it refuses with (MODEC_OK when it accepts) and
 * its message / the archs it read. */
modec_status Parse(const std::string& target, std::string* message, std::vector<std::string>* archs = nullptr) {
  try {
    a::Manifest m = a::ParseManifest(Manifest(target), "art/manifest.json", "x86_64");
    if (archs != nullptr) *archs = m.archs;
    message->clear();
    return MODEC_OK;
  } catch (const a::Failure& f) {
    *message = f.message;
    return f.status;
  }
}

bool Has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

int main() {
  // CudaArchRuns(sass, device): same major, device minor >= sass minor; "a" only on its own arch.
  const struct {
    const char* sass;
    const char* device;
    bool runs;
  } rule[] = {
      {"sm_90", "sm_90", true},    {"sm_80", "sm_86", true},    {"sm_80", "sm_89", true},
      {"sm_86", "sm_80", false},   {"sm_80", "sm_90", false},   {"sm_90", "sm_80", false},
      {"sm_75", "sm_80", false},   {"sm_90", "sm_100", false},  {"sm_100", "sm_103", true},
      {"sm_100", "sm_120", false}, {"sm_120", "sm_121", true},  {"sm_121", "sm_120", false},
      {"sm_90a", "sm_90", true},   {"sm_90a", "sm_91", false},  {"sm_100a", "sm_100", true},
      {"sm_100a", "sm_103", false}, {"sm_90", "sm_90a", false}, {"sm_9", "sm_90", false},
      {"compute_90", "sm_90", false}, {"sm_90", "", false},
  };
  for (const auto& r : rule) {
    Check(a::CudaArchRuns(r.sass, r.device) == r.runs, std::string("CudaArchRuns(") + r.sass + ", " + r.device +
                                                           ") is " + (r.runs ? "true" : "false"));
  }

  for (const char* name : {"sm_50", "sm_90", "sm_90a", "sm_100", "sm_100a", "sm_121"}) {
    Check(a::IsCudaArch(name), std::string("IsCudaArch(") + name + ")");
  }
  for (const char* name : {"", "sm_", "sm_9", "sm90", "SM_90", "sm_090", "sm_05", "sm_90b", "sm_90aa", "sm_a",
                           "sm_9x", "compute_90", "sm_90 ", "sm_12345"}) {
    Check(!a::IsCudaArch(name), std::string("not IsCudaArch('") + name + "')");
  }

  const struct {
    const char* version;
    const char* arch;
  } versions[] = {{"9.0", "sm_90"}, {"8.6", "sm_86"}, {"10.0", "sm_100"}, {"12.1", "sm_121"}, {"7.5", "sm_75"},
                  {"", ""},         {"9", ""},        {"9.", ""},         {".0", ""},         {"9.10", ""},
                  {"x.0", ""},      {"0.5", ""},      {"9.0a", ""}};
  for (const auto& v : versions) {
    Check(a::CudaArchOf(v.version) == v.arch,
          std::string("CudaArchOf('") + v.version + "') is '" + v.arch + "'");
  }

  // modec_open's refusal on a GPU that runs none of the archs: one line naming both, the fix.
  Check(a::CudaArchRefusal({"sm_80", "sm_90"}, "sm_86", "NVIDIA RTX A6000").empty(), "sm_80 runs on an sm_86 GPU");
  Check(a::CudaArchRefusal({"sm_90a"}, "sm_90", "NVIDIA H200").empty(), "sm_90a runs on an sm_90 GPU");
  const std::string refusal = a::CudaArchRefusal({"sm_90", "sm_100"}, "sm_86", "NVIDIA RTX A6000");
  Check(refusal == "artifact built for CUDA archs sm_90, sm_100; this GPU (NVIDIA RTX A6000) is sm_86: rebuild with "
                   "--target '{\"kind\": \"cuda\", \"arch\": \"sm_86\"}'",
        "refusal: " + refusal);
  Check(!a::CudaArchRefusal({"sm_90a"}, "sm_100", "NVIDIA B200").empty(), "sm_90a refused on an sm_100 GPU");

  // The manifest's CUDA target: archs read, or refused with the fix.
  std::string msg;
  std::vector<std::string> archs;
  modec_status st = Parse(
      R"({"kind": "cuda", "device": "cuda", "machine": "x86_64", "arch": "sm_80", "archs": ["sm_80", "sm_90a"]})", &msg,
      &archs);
  Check(st == MODEC_OK && archs == std::vector<std::string>{"sm_80", "sm_90a"}, "CUDA target: archs read " + msg);
  st = Parse(R"({"kind": "llvm", "device": "cpu", "machine": "x86_64"})", &msg, &archs);
  Check(st == MODEC_OK && archs.empty(), "CPU target: no archs " + msg);
  st = Parse(R"({"kind": "cuda", "device": "cuda", "machine": "x86_64", "arch": "sm_90"})", &msg);
  Check(st == MODEC_ERR_MANIFEST && Has(msg, "predates compiled CUDA kernels") &&
            Has(msg, "modec compile ... --target cuda"),
        "CUDA target without archs: MODEC_ERR_MANIFEST: " + msg);
  for (const char* bad : {R"([])", R"(["sm_9"])", R"("sm_90")", R"([90])", R"(["sm_90", "sm_90b"])", R"(null)"}) {
    st = Parse(std::string(R"({"kind": "cuda", "device": "cuda", "machine": "x86_64", "archs": )") + bad + "}", &msg);
    Check(st == MODEC_ERR_MANIFEST && Has(msg, "target.archs is malformed") && Has(msg, "--target cuda"),
          std::string("CUDA target, archs ") + bad + ": MODEC_ERR_MANIFEST: " + msg);
  }
  st = Parse(R"({"kind": "cuda", "device": "cuda", "machine": "aarch64", "archs": ["sm_90"]})", &msg);
  Check(st == MODEC_ERR_TARGET && Has(msg, "'aarch64'"), "CUDA target for another host: MODEC_ERR_TARGET: " + msg);
  st = Parse(R"({"kind": "cuda", "device": "cuda", "archs": ["sm_90"]})", &msg, &archs);
  Check(st == MODEC_OK && archs.size() == 1, "CUDA target without machine: accepted " + msg);

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
