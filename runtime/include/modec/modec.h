/*
 * modec runtime C API: load a modec artifact (model.so, weights.safetensors, manifest.json)
 * and run it on the TVM runtime. No C++ exception crosses this boundary: every function
 * returns a modec_status and, on failure, modec_last_error() gives a one-line message.
 *
 * Thread-safety: one session may be used by one thread at a time; distinct sessions are
 * independent. modec_last_error() is per thread.
 */
#ifndef MODEC_MODEC_H_
#define MODEC_MODEC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MODEC_API __declspec(dllexport)
#else
#define MODEC_API __attribute__((visibility("default")))
#endif

/* Status codes (stable; also the exit codes of examples/modec_run). */
typedef enum {
  MODEC_OK = 0,
  MODEC_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, unknown device, bad index, small output array */
  MODEC_ERR_IO = 2,               /* a file is missing or unreadable */
  MODEC_ERR_MANIFEST = 3,         /* manifest.json invalid JSON, wrong schema, bad field */
  MODEC_ERR_CHECKSUM = 4,         /* a file's size or SHA-256 differs from the manifest */
  MODEC_ERR_TARGET = 5,           /* built for another device / CPU / GPU arch; no usable GPU */
  MODEC_ERR_WEIGHTS = 6,          /* weights.safetensors malformed or not the manifest's */
  MODEC_ERR_INPUT = 7,            /* run(): wrong input names, dtypes, ranks or dims */
  MODEC_ERR_RUNTIME = 8           /* TVM failed to load the library or to run */
} modec_status;

/* Element types (the manifest's numpy names). Codes are stable; new types are added at the
 * end (MODEC_BFLOAT16: weights of a model stored in bf16; its raw 16-bit patterns). */
typedef enum {
  MODEC_FLOAT32 = 0,
  MODEC_FLOAT16 = 1,
  MODEC_FLOAT64 = 2,
  MODEC_INT64 = 3,
  MODEC_INT32 = 4,
  MODEC_INT8 = 5,
  MODEC_UINT8 = 6,
  MODEC_BOOL = 7,
  MODEC_UINT32 = 8, /* packed quantized codes of the MoE experts */
  MODEC_UINT16 = 9,
  MODEC_INT16 = 10,
  MODEC_UINT64 = 11,
  MODEC_BFLOAT16 = 12 /* bfloat16 (numpy name "bfloat16", safetensors "BF16") */
} modec_dtype;

/* A dense, C-contiguous tensor on the host (on a "cuda" session too: the runtime copies inputs
 * to the GPU and outputs back). For inputs the caller owns name, shape and data.
 * For outputs and for modec_input_info/modec_output_info the session owns them; they stay
 * valid until the next modec_run on that session or modec_close. In info queries a
 * symbolic dimension is -1 (its name is in manifest.json; the C API does not expose it). */
typedef struct {
  const char* name;
  modec_dtype dtype;
  int32_t ndim;
  const int64_t* shape;
  const void* data;
} modec_tensor;

typedef struct modec_session modec_session;

/* Open an artifact directory. device: "cpu" (NULL means "cpu") or "cuda" (GPU 0; an artifact
 * built with --target cuda, see docs/runtime_cuda.md: it needs the NVIDIA driver and
 * libcudart.so.13, and a GPU that runs one of the manifest's target.archs, else
 * MODEC_ERR_TARGET). Verifies the manifest (schema modec.artifact/1), the target, every
 * file's size and SHA-256, then maps weights.safetensors read-only (on "cpu" the params are
 * used from the mapping, not copied, until modec_close; on "cuda" they are copied to the GPU
 * and the file is unmapped) and loads the library. Do not modify the weights file in place
 * while a session uses it; replacing it by a rename is safe. */
MODEC_API modec_status modec_open(const char* dir, const char* device, modec_session** out);

/* Number of model inputs / outputs, and their descriptions (index < count). */
MODEC_API size_t modec_num_inputs(const modec_session* s);
MODEC_API size_t modec_num_outputs(const modec_session* s);
MODEC_API modec_status modec_input_info(const modec_session* s, size_t i, modec_tensor* info);
MODEC_API modec_status modec_output_info(const modec_session* s, size_t i, modec_tensor* info);

/* Run the model. inputs: n_inputs tensors, matched by name (any order). outputs: a caller
 * array of capacity *n_outputs; on success *n_outputs is set to the number written. */
MODEC_API modec_status modec_run(modec_session* s, const modec_tensor* inputs, size_t n_inputs,
                                 modec_tensor* outputs, size_t* n_outputs);

/* Close a session (NULL is allowed). Free its generations first. */
MODEC_API void modec_close(modec_session* s);

/* ---- Generation with a KV cache (docs/generation.md) ---------------------------------------
 *
 * For an artifact compiled from a model exported with a KV cache (past_key_values.{i}.key /
 * .value inputs, present.{i}.* outputs; the manifest's sections.generation). On any other
 * artifact every call below that takes a session returns MODEC_ERR_INVALID_ARGUMENT ("the
 * artifact has no KV cache: ...").
 *
 * The inputs of a generation are the prompt's: every model input but the cache
 * (input_ids [batch, seq] left-padded, attention_mask [batch, seq], pixel_values...), checked
 * as modec_run checks its inputs (names, dtypes, ranks, dims >= 1, shared symbols:
 * MODEC_ERR_INPUT); the runtime starts the cache empty. The cache stays in the tensors the
 * model returned (no copy to the host); each step appends a column of ones to the mask.
 * Tokens are picked as docs/generation.md specifies, so that the Python runtime's
 * Session.generate with the same settings gives the same tokens. */

/* How tokens are picked and when a row stops. temperature and top_p are doubles, the type of
 * the Python runtime's settings, so both runtimes compute with the same values. */
typedef struct {
  int32_t max_new_tokens;     /* >= 0; 0: the prefill runs, no token is picked */
  const int64_t* stop_tokens; /* a row that picks one of these stops (the token is kept) */
  size_t n_stop_tokens;
  double temperature; /* >= 0, finite; 0: greedy (argmax, the lowest id on ties) */
  int32_t top_k;      /* >= 0; 0: no limit; 1: greedy */
  double top_p;       /* in (0, 1]; 1: no limit */
  uint64_t seed;      /* SplitMix64 seed of the draws (sampling only) */
} modec_generation_config;

/* Greedy, 32 new tokens, no stop tokens, top_k 0, top_p 1, seed 0. */
MODEC_API void modec_generation_config_default(modec_generation_config* config);

/* Called once per step, after every unfinished row picked its token: tokens[b] is row b's
 * token of this step (a finished row repeats its last token), finished[b] is 1 once row b has
 * stopped (this step's stop token or max_new_tokens included). step counts from 0. Return 0 to
 * go on, anything else to stop the generation there (modec_generate then returns MODEC_OK with
 * the tokens so far). A C++ callback must not throw (modec_generate would return
 * MODEC_ERR_INVALID_ARGUMENT). */
typedef int (*modec_token_callback)(void* user, size_t step, const int64_t* tokens, const uint8_t* finished,
                                    size_t batch);

/* Prefill, then pick and decode until every row has stopped or the callback says stop.
 * out_tokens (may be NULL): batch * max_new_tokens int64, row-major; row b's tokens are
 * out_tokens[b * max_new_tokens + i] for i < out_lengths[b], the rest is set to -1.
 * out_lengths (may be NULL): batch int32. batch is the prompt's (dim 0 of input_ids).
 * callback may be NULL. Statuses: MODEC_ERR_INVALID_ARGUMENT (NULL session / config, a bad
 * setting, no KV cache), MODEC_ERR_INPUT (the prompt's inputs), MODEC_ERR_MANIFEST (an unusable
 * sections.generation), MODEC_ERR_RUNTIME (TVM failed, or NaN logits). */
MODEC_API modec_status modec_generate(modec_session* s, const modec_tensor* inputs, size_t n_inputs,
                                      const modec_generation_config* config, modec_token_callback callback,
                                      void* user, int64_t* out_tokens, int32_t* out_lengths);

/* The lower-level loop, for callers that pick tokens themselves. A generation belongs to its
 * session: free it before modec_close, and use it from the session's thread only. */
typedef struct modec_generation modec_generation;

/* Run the prompt (the model's main entry, the cache empty). On success *out holds the next-
 * token logits of every row (modec_generation_logits); on failure *out is NULL. */
MODEC_API modec_status modec_prefill(modec_session* s, const modec_tensor* inputs, size_t n_inputs,
                                     modec_generation** out);

/* Feed one token per row (batch must be the prompt's): the decode entry runs on the cache,
 * whose length grows by one; the logits become the next ones. On failure the generation is
 * left as it was. A cache updated in place (docs/generation.md) lives in buffers with room
 * for more positions, doubled when a step does not fit (modec_generate reserves its
 * max_new_tokens at once). */
MODEC_API modec_status modec_decode_step(modec_generation* g, const int64_t* tokens, size_t batch);

/* The next-token logits of every row, float32 [batch, vocab] row-major (logits[b, -1, :] of
 * the last call), owned by the generation: valid until its next decode step or free. */
MODEC_API modec_status modec_generation_logits(const modec_generation* g, const float** logits, size_t* batch,
                                               size_t* vocab);

/* Positions in the cache (prompt length + decode steps); 0 for NULL. */
MODEC_API size_t modec_generation_cache_length(const modec_generation* g);

/* modec_generate's loop on a prefilled (or stepped) generation g: pick from its logits,
 * stream, decode, until every row stopped (same outputs and statuses; batch is g's). On return
 * g's cache holds every picked token but the last ones (they were not decoded). */
MODEC_API modec_status modec_generate_from(modec_generation* g, const modec_generation_config* config,
                                           modec_token_callback callback, void* user, int64_t* out_tokens,
                                           int32_t* out_lengths);

/* Free a generation (NULL is allowed). */
MODEC_API void modec_generation_free(modec_generation* g);

/* Pick one token per row from logits [batch, vocab] as modec_generate does: rows with
 * finished[b] != 0 are skipped (tokens[b] left as it is, no draw; finished may be NULL),
 * *rng_state is the SplitMix64 state (set it to config->seed before the first step; each
 * sampled row advances it once). config's max_new_tokens and stop tokens are not used. */
MODEC_API modec_status modec_pick_tokens(const float* logits, size_t batch, size_t vocab,
                                         const modec_generation_config* config, uint64_t* rng_state,
                                         const uint8_t* finished, int64_t* tokens);

/* The message of the last failure on this thread ("" if none). */
MODEC_API const char* modec_last_error(void);

/* Name of a status code ("MODEC_ERR_CHECKSUM"...). */
MODEC_API const char* modec_status_name(modec_status st);

/* Size in bytes of one element. */
MODEC_API size_t modec_dtype_size(modec_dtype dt);

#ifdef __cplusplus
}
#endif
#endif /* MODEC_MODEC_H_ */
