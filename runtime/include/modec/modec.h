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
  MODEC_ERR_TARGET = 5,           /* the artifact was built for another device / CPU */
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

/* A dense, C-contiguous tensor on the host. For inputs the caller owns name, shape and data.
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

/* Open an artifact directory. device: "cpu" (NULL means "cpu") or "cuda".
 * Verifies the manifest (schema modec.artifact/1), the target, every file's size and
 * SHA-256, then maps weights.safetensors read-only (the params are used from the mapping, not
 * copied, until modec_close) and loads the library. Do not modify the weights file in place
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

/* Close a session (NULL is allowed). */
MODEC_API void modec_close(modec_session* s);

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
