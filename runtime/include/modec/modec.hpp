// Header-only C++ wrapper over the modec C API: RAII session, exceptions on the C++ side.
#ifndef MODEC_MODEC_HPP_
#define MODEC_MODEC_HPP_

#include <modec/modec.h>

#include <cstdint>
#include <exception>
#include <functional>
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

/*! \brief How tokens are picked (modec_generation_config; docs/generation.md). */
struct GenerationConfig {
  int32_t max_new_tokens = 32;
  std::vector<int64_t> stop;  // a row that picks one stops (the token is kept)
  double temperature = 0.0;   // 0: greedy
  int32_t top_k = 0;          // 0: no limit
  double top_p = 1.0;         // 1: no limit
  uint64_t seed = 0;

  modec_generation_config ToC() const {
    modec_generation_config cfg;
    modec_generation_config_default(&cfg);
    cfg.max_new_tokens = max_new_tokens;
    cfg.stop_tokens = stop.data();
    cfg.n_stop_tokens = stop.size();
    cfg.temperature = temperature;
    cfg.top_k = top_k;
    cfg.top_p = top_p;
    cfg.seed = seed;
    return cfg;
  }
};

/*! \brief Streams each step: (step, every row's token, which rows have stopped); return true
 * to stop the generation there. An exception it throws stops the generation and is rethrown
 * by Generate. */
using TokenCallback =
    std::function<bool(size_t step, const std::vector<int64_t>& tokens, const std::vector<uint8_t>& finished)>;

/*! \brief A generation in progress (move-only; modec_prefill / modec_decode_step): free it
 * before its Session is destroyed. */
class Generation {
 public:
  explicit Generation(modec_generation* g) : g_(g) {}
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;
  Generation(Generation&& o) noexcept : g_(std::exchange(o.g_, nullptr)) {}
  Generation& operator=(Generation&& o) noexcept {
    if (this != &o) {
      modec_generation_free(g_);
      g_ = std::exchange(o.g_, nullptr);
    }
    return *this;
  }
  ~Generation() { modec_generation_free(g_); }

  size_t batch() const { return Shape().first; }
  size_t vocab() const { return Shape().second; }
  size_t cache_length() const { return modec_generation_cache_length(g_); }

  /*! \brief Row b's next-token logits (vocab floats), valid until the next step. */
  const float* logits(size_t b) const {
    const float* p = nullptr;
    size_t n = 0, v = 0;
    Check(modec_generation_logits(g_, &p, &n, &v));
    if (b >= n) throw Error(MODEC_ERR_INVALID_ARGUMENT, "row " + std::to_string(b) + " of " + std::to_string(n));
    return p + b * v;
  }

  void DecodeStep(const std::vector<int64_t>& tokens) { Check(modec_decode_step(g_, tokens.data(), tokens.size())); }

  /*! \brief The loop from here (modec_generate_from): each row's tokens, a stop token kept as
   * its last. */
  std::vector<std::vector<int64_t>> Generate(const GenerationConfig& cfg = {}, const TokenCallback& cb = {}) {
    const size_t n = batch(), max_new = cfg.max_new_tokens > 0 ? static_cast<size_t>(cfg.max_new_tokens) : 0;
    std::vector<int64_t> flat(n * max_new);
    std::vector<int32_t> lengths(n);
    Stream stream{&cb, {}, {}, {}};
    const modec_generation_config c = cfg.ToC();
    modec_status st = modec_generate_from(g_, &c, cb ? &Stream::Call : nullptr, &stream, flat.data(), lengths.data());
    if (stream.error) std::rethrow_exception(stream.error);
    Check(st);
    std::vector<std::vector<int64_t>> rows(n);
    for (size_t b = 0; b < n; ++b) rows[b].assign(flat.begin() + b * max_new, flat.begin() + b * max_new + lengths[b]);
    return rows;
  }

  modec_generation* get() const { return g_; }

 private:
  struct Stream {
    const TokenCallback* cb;
    std::vector<int64_t> tokens;
    std::vector<uint8_t> finished;
    std::exception_ptr error;
    static int Call(void* user, size_t step, const int64_t* tokens, const uint8_t* finished, size_t batch) {
      auto* s = static_cast<Stream*>(user);
      try {  // no exception crosses the C API: kept here, rethrown by Generate
        s->tokens.assign(tokens, tokens + batch);
        s->finished.assign(finished, finished + batch);
        return (*s->cb)(step, s->tokens, s->finished) ? 1 : 0;
      } catch (...) {
        s->error = std::current_exception();
        return 1;
      }
    }
  };
  std::pair<size_t, size_t> Shape() const {
    const float* p = nullptr;
    size_t n = 0, v = 0;
    Check(modec_generation_logits(g_, &p, &n, &v));
    return {n, v};
  }
  modec_generation* g_ = nullptr;
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

  /*! \brief Run the prompt (every input but the KV cache); see modec_prefill. */
  Generation Prefill(const std::vector<modec_tensor>& in) {
    modec_generation* g = nullptr;
    Check(modec_prefill(s_, in.data(), in.size(), &g));
    return Generation(g);
  }

  /*! \brief Generate from a prompt (modec_generate): each row's tokens, a stop token kept as
   * its last; `cb` streams every step. */
  std::vector<std::vector<int64_t>> Generate(const std::vector<modec_tensor>& in, const GenerationConfig& cfg = {},
                                             const TokenCallback& cb = {}) {
    return Prefill(in).Generate(cfg, cb);
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
