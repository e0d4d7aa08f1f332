// modec_consumer: the smallest program built against an installed modec runtime
// (find_package(modec) / modec::modec). It opens an artifact, lists its inputs and outputs,
// runs it once on inputs filled with ones (every symbolic dimension set to 1) and prints
// each output's shape and, for float32 outputs, the sum of its elements.
//
//   modec_consumer ARTIFACT_DIR
//
// Exit status: 0 on success, the modec_status code when the runtime refuses, 64 on bad usage.
#include <modec/modec.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

const char* DtypeName(modec_dtype dt) {
  static const char* const kNames[] = {"float32", "float16", "float64", "int64",
                                       "int32",   "int8",    "uint8",   "bool",
                                       "uint32",  "uint16",  "int16",   "uint64"};
  auto i = static_cast<size_t>(dt);
  return i < sizeof(kNames) / sizeof(kNames[0]) ? kNames[i] : "?";
}

std::string Shape(const int64_t* dims, int32_t ndim) {
  std::string s = "[";
  for (int32_t i = 0; i < ndim; ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

// One element of value 1 in the given dtype (float16 1.0 is 0x3C00).
std::vector<uint8_t> One(modec_dtype dt) {
  std::vector<uint8_t> b(modec_dtype_size(dt), 0);
  switch (dt) {
    case MODEC_FLOAT32: {
      float v = 1.0f;
      std::memcpy(b.data(), &v, sizeof v);
      break;
    }
    case MODEC_FLOAT64: {
      double v = 1.0;
      std::memcpy(b.data(), &v, sizeof v);
      break;
    }
    case MODEC_FLOAT16: {
      uint16_t v = 0x3C00;
      std::memcpy(b.data(), &v, sizeof v);
      break;
    }
    default:
      b[0] = 1;  // integers and bool, little-endian
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: modec_consumer ARTIFACT_DIR\n");
    return 64;
  }
  try {
    modec::Session sess(argv[1]);
    std::vector<modec_tensor> inputs = sess.inputs();
    for (const modec_tensor& t : inputs) {
      std::printf("input %s %s %s\n", t.name, DtypeName(t.dtype), Shape(t.shape, t.ndim).c_str());
    }
    for (const modec_tensor& t : sess.outputs()) {
      std::printf("output %s %s %s\n", t.name, DtypeName(t.dtype), Shape(t.shape, t.ndim).c_str());
    }

    // The info tensors are owned by the session: copy names and shapes before running.
    std::vector<std::string> names;
    std::vector<std::vector<int64_t>> shapes;
    std::vector<std::vector<uint8_t>> data;
    for (const modec_tensor& t : inputs) {
      names.emplace_back(t.name);
      shapes.emplace_back(t.shape, t.shape + t.ndim);
      size_t numel = 1;
      for (int64_t& d : shapes.back()) {
        if (d < 0) d = 1;  // symbolic dimension
        numel *= static_cast<size_t>(d);
      }
      std::vector<uint8_t> one = One(t.dtype), buf;
      buf.reserve(numel * one.size());
      for (size_t i = 0; i < numel; ++i) buf.insert(buf.end(), one.begin(), one.end());
      data.push_back(std::move(buf));
    }
    std::vector<modec_tensor> feed(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      feed[i] = modec_tensor{names[i].c_str(), inputs[i].dtype,
                             static_cast<int32_t>(shapes[i].size()), shapes[i].data(),
                             data[i].data()};
    }
    for (const modec::Tensor& t : sess.Run(feed)) {
      std::printf("result %s %s %s", t.name.c_str(), DtypeName(t.dtype),
                  Shape(t.shape.data(), static_cast<int32_t>(t.shape.size())).c_str());
      if (t.dtype == MODEC_FLOAT32) {
        double sum = 0;
        for (int64_t i = 0; i < t.numel(); ++i) sum += t.data<float>()[i];
        std::printf(" sum %.9g", sum);
      }
      std::printf("\n");
    }
  } catch (const modec::Error& e) {
    std::fprintf(stderr, "modec_consumer: %s: %s\n", modec_status_name(e.status()), e.what());
    return static_cast<int>(e.status());
  }
  return 0;
}
