// modec_run: load a modec artifact, read inputs from .npy files, run, write outputs as .npy
// and print the top answer (argmax over the last axis at the last position of the first
// output, for each batch row).
//
//   modec_run ARTIFACT_DIR [--device cpu|cuda] name=path.npy [name=path.npy ...] [--out DIR]
//
// --device picks where the artifact runs (default cpu): a CUDA artifact (`modec compile ...
// --target cuda`) runs on device cuda, GPU 0 (docs/runtime_cuda.md); inputs and outputs are
// host .npy files either way.
//
// With --generate N (an artifact with a KV cache; the .npy files are the prompt's inputs, the
// cache excluded) it generates up to N tokens per row instead (docs/generation.md), printing
// each step's tokens as they come ("step S: T0 T1 ...", "." for a row that has stopped),
// then each row's tokens ("tokens[B]: ...") and the speed:
//
//   modec_run ARTIFACT_DIR [--device cpu|cuda] --generate N [--temperature T] [--top-k K]
//             [--top-p P] [--seed S] [--stop ID ...] name=path.npy [name=path.npy ...]
//
// Exit status: 0 on success, the modec_status code on a runtime error, 64 on bad usage or
// unreadable .npy files.
#include <modec/modec.hpp>

#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Npy {
  modec_dtype dtype = MODEC_FLOAT32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
};

const struct {
  const char* descr;
  modec_dtype dtype;
} kNpyTypes[] = {{"<f4", MODEC_FLOAT32}, {"<f2", MODEC_FLOAT16}, {"<f8", MODEC_FLOAT64},
                 {"<i8", MODEC_INT64},   {"<i4", MODEC_INT32},   {"|i1", MODEC_INT8},
                 {"|u1", MODEC_UINT8},   {"|b1", MODEC_BOOL},    {"<u4", MODEC_UINT32},
                 {"<u2", MODEC_UINT16},  {"<i2", MODEC_INT16},   {"<u8", MODEC_UINT64}};

bool Fail(std::string* err, const std::string& msg) {
  *err = msg;
  return false;
}

// Reads a C-order little-endian .npy (format 1.0 / 2.0 / 3.0). Every refusal is one line
// "PATH: what is wrong".
bool ReadNpy(const std::string& path, Npy* out, std::string* err) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Fail(err, path + ": cannot open");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (all.size() < 6 || all.compare(0, 6, "\x93NUMPY") != 0) {
    return Fail(err, path + ": not a .npy file (no \\x93NUMPY magic)");
  }
  if (all.size() < 10) return Fail(err, path + ": truncated header");
  int major = static_cast<uint8_t>(all[6]);
  if (major < 1 || major > 3) return Fail(err, path + ": unsupported .npy format version " + std::to_string(major));
  size_t hlen, hstart;
  if (major == 1) {
    hlen = static_cast<uint8_t>(all[8]) | (static_cast<uint8_t>(all[9]) << 8);
    hstart = 10;
  } else {
    if (all.size() < 12) return Fail(err, path + ": truncated header");
    hlen = 0;
    for (int i = 3; i >= 0; --i) hlen = (hlen << 8) | static_cast<uint8_t>(all[8 + i]);
    hstart = 12;
  }
  if (hlen > all.size() - hstart) return Fail(err, path + ": truncated header");
  std::string h = all.substr(hstart, hlen);
  // The text after "'key':" (empty when the key is absent).
  auto field = [&](const std::string& key) -> std::string {
    size_t p = h.find("'" + key + "'");
    if (p == std::string::npos) return "";
    p = h.find(':', p);
    if (p == std::string::npos) return "";
    size_t q = h.find_first_not_of(' ', p + 1);
    return q == std::string::npos ? "" : h.substr(q);
  };
  std::string descr = field("descr");
  if (descr.size() < 2 || descr[0] != '\'' || descr.find('\'', 1) == std::string::npos) {
    return Fail(err, path + ": bad header (no 'descr' string)");
  }
  descr = descr.substr(1, descr.find('\'', 1) - 1);
  bool found = false;
  for (const auto& t : kNpyTypes) {
    // '=' is native order: little-endian on the hosts this runtime builds for.
    if (descr == t.descr || (descr.size() == 3 && descr[0] == '=' && descr.compare(1, 2, t.descr + 1) == 0)) {
      out->dtype = t.dtype;
      found = true;
    }
  }
  if (!found) {
    std::string shown = descr.size() > 16 ? descr.substr(0, 16) + "..." : descr;
    for (char& c : shown) c = static_cast<unsigned char>(c) < 0x20 ? '?' : c;
    return Fail(err, path + ": unsupported dtype '" + shown +
                         "' (little-endian bool, int8-64, uint8-64, float16/32/64 only)");
  }
  std::string fortran = field("fortran_order");
  if (fortran.compare(0, 4, "True") == 0) {
    return Fail(err, path + ": Fortran order is not supported (save it C-contiguous)");
  }
  if (fortran.compare(0, 5, "False") != 0) return Fail(err, path + ": bad header (no 'fortran_order' True/False)");
  std::string shp = field("shape");
  size_t b = shp.find(')');
  if (shp.empty() || shp[0] != '(' || b == std::string::npos) {
    return Fail(err, path + ": bad header (no 'shape' tuple)");
  }
  std::stringstream ss(shp.substr(1, b - 1));
  std::string tok;
  size_t numel = 1;
  const size_t esize = modec_dtype_size(out->dtype);
  while (std::getline(ss, tok, ',')) {
    size_t first = tok.find_first_not_of(' ');
    if (first == std::string::npos) continue;
    size_t last = tok.find_last_not_of(' ');
    tok = tok.substr(first, last - first + 1);
    if (tok.empty() || tok.size() > 18 || tok.find_first_not_of("0123456789") != std::string::npos) {
      return Fail(err, path + ": bad header (shape entry '" + tok.substr(0, 20) + "' is not a size)");
    }
    int64_t d = std::stoll(tok);  // digits only, < 10^18: cannot throw
    // numel * esize must fit the file: this bounds every product below (no overflow).
    if (d != 0 && numel > all.size() / esize / static_cast<size_t>(d)) {
      return Fail(err, path + ": data size does not match its shape (the shape needs more bytes than the file "
                           "has)");
    }
    numel *= static_cast<size_t>(d);
    out->shape.push_back(d);
  }
  size_t nbytes = numel * esize;
  if (hstart + hlen + nbytes != all.size()) {
    return Fail(err, path + ": data size does not match its shape (" + std::to_string(all.size() - hstart - hlen) +
                         " bytes of data, the shape needs " + std::to_string(nbytes) + "; truncated?)");
  }
  out->data.assign(all.begin() + hstart + hlen, all.end());
  return true;
}

bool WriteNpy(const std::string& path, const modec::Tensor& t, std::string* err) {
  const char* descr = nullptr;
  for (const auto& k : kNpyTypes) {
    if (k.dtype == t.dtype) descr = k.descr;
  }
  if (descr == nullptr) return Fail(err, "no .npy type for output " + t.name);
  std::string shape = "(";
  for (size_t i = 0; i < t.shape.size(); ++i) shape += std::to_string(t.shape[i]) + (t.shape.size() == 1 ? "," : (i + 1 < t.shape.size() ? ", " : ""));
  shape += ")";
  std::string h = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) return Fail(err, path + ": cannot write");
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t n = static_cast<uint16_t>(h.size());
  char len[2] = {static_cast<char>(n & 0xff), static_cast<char>(n >> 8)};
  f.write(len, 2);
  f.write(h.data(), h.size());
  f.write(reinterpret_cast<const char*>(t.bytes.data()), t.bytes.size());
  return f.good() ? true : Fail(err, path + ": write failed");
}

int Usage() {
  std::cerr << "usage: modec_run ARTIFACT_DIR [--device cpu|cuda] name=path.npy [name=path.npy ...] [--out DIR] | "
               "--generate N [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop ID ...]\n";
  return 64;
}

// A whole-string number (strtoll / strtoull / strtod); false on anything else.
bool Int(const char* s, int64_t lo, int64_t hi, int64_t* out) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s, &end, 10);
  if (end == s || *end != '\0' || errno != 0 || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool Uint(const char* s, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  if (*s == '-') return false;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s || *end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

bool Real(const char* s, double* out) {
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s, &end);
  if (end == s || *end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

int Generate(modec::Session& sess, const std::vector<modec_tensor>& in, const modec::GenerationConfig& cfg) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  modec::Generation gen = sess.Prefill(in);
  const auto t1 = Clock::now();
  std::vector<uint8_t> done(gen.batch(), 0);
  auto print = [&](size_t step, const std::vector<int64_t>& tokens, const std::vector<uint8_t>& finished) {
    std::cout << "step " << step << ":";
    for (size_t b = 0; b < tokens.size(); ++b) {
      if (done[b]) {
        std::cout << " .";
      } else {
        std::cout << " " << tokens[b];
      }
    }
    std::cout << std::endl;  // streamed: flushed each step
    done = finished;
    return false;
  };
  auto rows = gen.Generate(cfg, print);
  const auto t2 = Clock::now();
  size_t n = 0, decoded = 0;  // every token; those the decode steps produced (all but each row's first)
  for (size_t b = 0; b < rows.size(); ++b) {
    std::cout << "tokens[" << b << "]:";
    for (int64_t t : rows[b]) std::cout << " " << t;
    std::cout << "\n";
    n += rows[b].size();
    decoded += rows[b].empty() ? 0 : rows[b].size() - 1;
  }
  const double prefill = std::chrono::duration<double>(t1 - t0).count();
  const double decode = std::chrono::duration<double>(t2 - t1).count();
  std::printf("generated %zu tokens in %zu rows: prefill %.3f s, decode %.3f s (%.1f tokens/s)\n", n, rows.size(),
              prefill, decode, decode > 0 ? static_cast<double>(decoded) / decode : 0.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  std::string dir = argv[1], out_dir = ".", device = "cpu";
  std::vector<std::string> names;
  std::vector<Npy> arrays;
  bool generate = false, options = false;  // --generate, its settings
  modec::GenerationConfig cfg;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
      continue;
    }
    if (a.compare(0, 2, "--") == 0 && a != "--out") {
      if (i + 1 >= argc) return Usage();
      const char* v = argv[++i];
      int64_t k = 0;
      bool ok = true;
      if (a == "--device") {
        device = v;
        ok = device == "cpu" || device == "cuda";
      } else if (a == "--generate") {
        ok = Int(v, 0, INT32_MAX, &k);
        cfg.max_new_tokens = static_cast<int32_t>(k);
        generate = true;
      } else if (a == "--temperature") {
        ok = Real(v, &cfg.temperature);
      } else if (a == "--top-k") {
        ok = Int(v, 0, INT32_MAX, &k);
        cfg.top_k = static_cast<int32_t>(k);
      } else if (a == "--top-p") {
        ok = Real(v, &cfg.top_p);
      } else if (a == "--seed") {
        ok = Uint(v, &cfg.seed);
      } else if (a == "--stop") {
        ok = Int(v, INT64_MIN, INT64_MAX, &k);
        cfg.stop.push_back(k);
      } else {
        ok = false;
      }
      if (!ok) return Usage();
      options = options || (a != "--generate" && a != "--device");
      continue;
    }
    size_t eq = a.find('=');
    if (eq == std::string::npos || eq == 0) return Usage();
    Npy npy;
    std::string err;
    if (!ReadNpy(a.substr(eq + 1), &npy, &err)) {
      std::cerr << "modec_run: " << err << "\n";
      return 64;
    }
    names.push_back(a.substr(0, eq));
    arrays.push_back(std::move(npy));
  }
  if (options && !generate) return Usage();  // generation settings without --generate
  try {
    modec::Session sess(dir, device);
    std::vector<modec_tensor> in(arrays.size());
    for (size_t i = 0; i < arrays.size(); ++i) {
      in[i] = modec_tensor{names[i].c_str(), arrays[i].dtype, static_cast<int32_t>(arrays[i].shape.size()),
                           arrays[i].shape.data(), arrays[i].data.data()};
    }
    if (generate) return Generate(sess, in, cfg);
    std::vector<modec::Tensor> outs = sess.Run(in);
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    if (ec) {
      std::cerr << "modec_run: " << out_dir << ": cannot create the output directory (" << ec.message()
                << "); pass an existing or creatable --out\n";
      return 64;
    }
    for (const auto& t : outs) {
      std::string err;
      if (!WriteNpy(out_dir + "/" + t.name + ".npy", t, &err)) {
        std::cerr << "modec_run: " << err << "\n";
        return 64;
      }
    }
    const modec::Tensor& first = outs.at(0);
    if (first.dtype == MODEC_FLOAT32 && first.shape.size() >= 2) {
      int64_t v = first.shape.back(), rows = first.shape.front();
      int64_t per_row = first.numel() / rows;
      const float* p = first.data<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const float* last = p + r * per_row + per_row - v;  // last position of row r
        int64_t best = 0;
        for (int64_t j = 1; j < v; ++j) {
          if (last[j] > last[best]) best = j;
        }
        std::cout << "top answer[" << r << "]: " << best << "\n";
      }
    }
  } catch (const modec::Error& e) {
    std::cerr << "modec_run: " << modec_status_name(e.status()) << ": " << e.what() << "\n";
    return static_cast<int>(e.status());
  }
  return 0;
}
