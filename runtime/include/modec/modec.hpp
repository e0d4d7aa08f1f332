// Header-only C++ wrapper over the modec C API: RAII session, exceptions on the C++ side.
#ifndef MODEC_MODEC_HPP_
#define MODEC_MODEC_HPP_

#include <modec/modec.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace modec {

/*! \brief A failed modec call: the status and modec_last_error()'s message. */
class Error : public std::runtime_error {
 public:
  Error(modec_status status, const std::string& msg) : std::runtime_error(msg), status_(status) {}
  modec_status status() const { return status_; }

 private:
  modec_status status_;
};

inline void Check(modec_status st) {
  if (st != MODEC_OK) throw Error(st, modec_last_error());
}

/*! \brief An output tensor copied out of the session. */
struct Tensor {
  std::string name;
  modec_dtype dtype = MODEC_FLOAT32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  template <typename T>
  const T* data() const {
    return reinterpret_cast<const T*>(bytes.data());
  }
};

/*! \brief An open artifact (move-only). */
class Session {
 public:
  explicit Session(const std::string& dir, const std::string& device = "cpu") {
    Check(modec_open(dir.c_str(), device.c_str(), &s_));
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  Session(Session&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Session& operator=(Session&& o) noexcept {
    if (this != &o) {
      modec_close(s_);
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  ~Session() { modec_close(s_); }

  std::vector<modec_tensor> inputs() const { return Infos(modec_num_inputs(s_), true); }
  std::vector<modec_tensor> outputs() const { return Infos(modec_num_outputs(s_), false); }

  /*! \brief Run; the outputs are copied so they outlive the next call. */
  std::vector<Tensor> Run(const std::vector<modec_tensor>& in) {
    size_t n = modec_num_outputs(s_);
    std::vector<modec_tensor> out(n);
    Check(modec_run(s_, in.data(), in.size(), out.data(), &n));
    std::vector<Tensor> res(n);
    for (size_t i = 0; i < n; ++i) {
      res[i].name = out[i].name;
      res[i].dtype = out[i].dtype;
      res[i].shape.assign(out[i].shape, out[i].shape + out[i].ndim);
      size_t nbytes = static_cast<size_t>(res[i].numel()) * modec_dtype_size(out[i].dtype);
      const auto* p = static_cast<const uint8_t*>(out[i].data);
      res[i].bytes.assign(p, p + nbytes);
    }
    return res;
  }

  modec_session* get() const { return s_; }

 private:
  std::vector<modec_tensor> Infos(size_t n, bool in) const {
    std::vector<modec_tensor> v(n);
    for (size_t i = 0; i < n; ++i) Check(in ? modec_input_info(s_, i, &v[i]) : modec_output_info(s_, i, &v[i]));
    return v;
  }
  modec_session* s_ = nullptr;
};

}  // namespace modec
#endif  // MODEC_MODEC_HPP_
