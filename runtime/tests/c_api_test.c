/* c_api_test: the modec C API called from plain C11 (no C++ wrapper, compiled as C).
 *
 *   c_api_test --no-artifact              the checks that need no artifact
 *   c_api_test DIR                        all of them on a valid artifact: success, and every
 *                                         error the API can report for it (NULL pointers, bad
 *                                         device or path, wrong input names, dtypes, ranks,
 *                                         dims, output array too small, missing data/shape)
 *   c_api_test DIR --open STATUS [TEXT]   modec_open(DIR) must fail with exactly STATUS, leave
 *                                         the session NULL and say TEXT in its message
 *   c_api_test DIR --run STATUS [TEXT]    modec_open(DIR) succeeds and modec_run on valid
 *                                         inputs returns exactly STATUS (TEXT in the message)
 *   c_api_test DIR --generate             generation on an artifact with a KV cache: modec_generate
 *                                         against the prefill / pick / decode-step loop, the
 *                                         callback, stop tokens, max_new_tokens 0, bad settings
 *                                         and prompts, modec_run with an empty (P = 0) cache
 *
 * Without --generate, an artifact without a KV cache must refuse every generation call.
 *
 * STATUS is a number or a name: MODEC_ERR_CHECKSUM, ERR_CHECKSUM, CHECKSUM, 4, OK.
 * Every failing call must leave modec_last_error() one non-empty line (no '\n' / '\r')
 * naming the problem; every successful call must clear it to "".
 * Valid inputs: every symbolic dimension is 2 (one size for all symbols, so inputs that share
 * a symbol agree), every element is 1 (a valid token id, an unmasked position).
 *
 * Output: one line per check ("ok   ..." or "FAIL ..."), then "N passed, M failed".
 * Exit status: 0 when M == 0, 1 otherwise, 2 on bad usage of this program.
 */
#include <modec/modec.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <threads.h>

#define MAX_IN 16
#define MAX_OUT 16
#define MAX_DIM 8
#define SYM 2 /* the size given to every symbolic dimension */

static int n_pass, n_fail;

static void record(int ok, const char* what, const char* detail) {
  if (ok) {
    ++n_pass;
    printf("ok   %s\n", what);
  } else {
    ++n_fail;
    printf("FAIL %s: %s\n", what, detail);
  }
}

static void check(int cond, const char* what) { record(cond, what, "condition is false"); }

/* Non-empty, no line break, no other control character. */
static int one_line(const char* msg) {
  if (msg == NULL || msg[0] == '\0') return 0;
  for (const char* p = msg; *p; ++p) {
    if ((unsigned char)*p < 0x20 && *p != '\t') return 0;
  }
  return 1;
}

/* The call returned `got`; it must be `want`, with modec_last_error() cleared on success or
 * one line containing `needle` (when not NULL) on failure. */
static void expect(const char* what, modec_status got, modec_status want, const char* needle) {
  const char* msg = modec_last_error();
  char detail[1024];
  int ok = got == want;
  if (!ok) {
    snprintf(detail, sizeof detail, "returned %s (%d), expected %s (%d); message: \"%s\"",
             modec_status_name(got), (int)got, modec_status_name(want), (int)want, msg ? msg : "(null)");
  } else if (want == MODEC_OK) {
    ok = msg != NULL && msg[0] == '\0';
    snprintf(detail, sizeof detail, "succeeded but modec_last_error() is \"%s\", not \"\"", msg ? msg : "(null)");
  } else if (!one_line(msg)) {
    ok = 0;
    snprintf(detail, sizeof detail, "%s with a message that is not one non-empty line: \"%s\"",
             modec_status_name(got), msg ? msg : "(null)");
  } else if (needle != NULL && strstr(msg, needle) == NULL) {
    ok = 0;
    snprintf(detail, sizeof detail, "%s but the message does not say \"%s\": \"%s\"", modec_status_name(got),
             needle, msg);
  }
  if (ok && want != MODEC_OK) {
    ++n_pass;
    printf("ok   %s: %s: %s\n", what, modec_status_name(got), msg);
  } else {
    record(ok, what, detail);
  }
}

static int parse_status(const char* s, modec_status* out) {
  char* end = NULL;
  long v = strtol(s, &end, 10);
  if (end != s && *end == '\0') {
    *out = (modec_status)v;
    return v >= MODEC_OK && v <= MODEC_ERR_RUNTIME;
  }
  for (int i = MODEC_OK; i <= MODEC_ERR_RUNTIME; ++i) {
    const char* name = modec_status_name((modec_status)i); /* "MODEC_OK", "MODEC_ERR_IO"... */
    const char* bare = i == MODEC_OK ? name + 6 : name + 10;
    if (strcmp(s, name) == 0 || strcmp(s, name + 6) == 0 || strcmp(s, bare) == 0) {
      *out = (modec_status)i;
      return 1;
    }
  }
  return 0;
}

/* ---- inputs ------------------------------------------------------------------------------ */

typedef struct {
  size_t n;
  modec_tensor t[MAX_IN];
  int64_t shape[MAX_IN][MAX_DIM + 1];
  void* data[MAX_IN];
} Inputs;

static void fill_ones(void* p, modec_dtype dt, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    switch (dt) {
      case MODEC_FLOAT32: ((float*)p)[i] = 1.0f; break;
      case MODEC_FLOAT64: ((double*)p)[i] = 1.0; break;
      case MODEC_FLOAT16: ((uint16_t*)p)[i] = 0x3C00; break;
      case MODEC_BFLOAT16: ((uint16_t*)p)[i] = 0x3F80; break;
      case MODEC_INT64: ((int64_t*)p)[i] = 1; break;
      case MODEC_UINT64: ((uint64_t*)p)[i] = 1; break;
      case MODEC_INT32: ((int32_t*)p)[i] = 1; break;
      case MODEC_UINT32: ((uint32_t*)p)[i] = 1; break;
      case MODEC_INT16: ((int16_t*)p)[i] = 1; break;
      case MODEC_UINT16: ((uint16_t*)p)[i] = 1; break;
      default: ((uint8_t*)p)[i] = 1; break; /* int8, uint8, bool */
    }
  }
}

/* Valid inputs from modec_input_info. Buffers are sized for symbolic dims up to 2 * SYM and
 * one extra dim, so a runtime that wrongly accepts a bad shape still reads inside them. */
static int make_inputs(const modec_session* s, Inputs* in) {
  memset(in, 0, sizeof *in);
  in->n = modec_num_inputs(s);
  if (in->n == 0 || in->n > MAX_IN) {
    record(0, "make_inputs", "no inputs or too many for this test");
    return 0;
  }
  for (size_t i = 0; i < in->n; ++i) {
    modec_tensor info;
    if (modec_input_info(s, i, &info) != MODEC_OK || info.ndim > MAX_DIM) {
      record(0, "make_inputs", "modec_input_info failed or rank too large");
      return 0;
    }
    size_t numel = 1, cap = 1;
    for (int32_t d = 0; d < info.ndim; ++d) {
      int64_t v = info.shape[d] < 0 ? SYM : info.shape[d];
      in->shape[i][d] = v;
      numel *= (size_t)v;
      cap *= (size_t)(info.shape[d] < 0 ? 2 * SYM : info.shape[d] + 1);
    }
    in->shape[i][info.ndim] = 1; /* the extra dim of the wrong-rank check */
    size_t esz = modec_dtype_size(info.dtype);
    in->data[i] = calloc(cap + 1, esz);
    if (in->data[i] == NULL) return 0;
    fill_ones(in->data[i], info.dtype, numel);
    in->t[i].name = info.name; /* owned by the session, valid while it is open */
    in->t[i].dtype = info.dtype;
    in->t[i].ndim = info.ndim;
    in->t[i].shape = in->shape[i];
    in->t[i].data = in->data[i];
  }
  return 1;
}

static void free_inputs(Inputs* in) {
  for (size_t i = 0; i < in->n; ++i) free(in->data[i]);
}

/* ---- checks ------------------------------------------------------------------------------ */

static void check_static_api(void) {
  static const char* names[] = {"MODEC_OK", "MODEC_ERR_INVALID_ARGUMENT", "MODEC_ERR_IO",
                                "MODEC_ERR_MANIFEST", "MODEC_ERR_CHECKSUM", "MODEC_ERR_TARGET",
                                "MODEC_ERR_WEIGHTS", "MODEC_ERR_INPUT", "MODEC_ERR_RUNTIME"};
  int names_ok = 1;
  for (int i = 0; i <= MODEC_ERR_RUNTIME; ++i) names_ok &= strcmp(modec_status_name((modec_status)i), names[i]) == 0;
  check(names_ok, "modec_status_name names codes 0..8");
  check(strcmp(modec_status_name((modec_status)99), "MODEC_ERR_UNKNOWN") == 0, "modec_status_name(99)");

  static const size_t sizes[] = {4, 2, 8, 8, 4, 1, 1, 1, 4, 2, 2, 8, 2}; /* MODEC_FLOAT32.. */
  int sizes_ok = 1;
  for (int i = 0; i <= MODEC_BFLOAT16; ++i) sizes_ok &= modec_dtype_size((modec_dtype)i) == sizes[i];
  check(sizes_ok, "modec_dtype_size of every dtype");
  check(modec_dtype_size((modec_dtype)99) == 0, "modec_dtype_size(99) == 0");

  check(modec_num_inputs(NULL) == 0 && modec_num_outputs(NULL) == 0, "modec_num_inputs/outputs(NULL) == 0");
  modec_close(NULL);
  check(1, "modec_close(NULL)");
}

/* ---- picking tokens (no artifact needed) -------------------------------------------------- */

#define GOLDEN 0x9E3779B97F4A7C15ull /* SplitMix64's increment: the state after k draws is seed + k * GOLDEN */

static void check_pick_tokens(void) {
  modec_generation_config c;
  modec_generation_config_default(&c);
  check(c.max_new_tokens == 32 && c.temperature == 0.0 && c.top_k == 0 && c.top_p == 1.0 && c.seed == 0 &&
            c.n_stop_tokens == 0 && c.stop_tokens == NULL,
        "modec_generation_config_default: greedy, 32 tokens, top_p 1");
  /* Greedy: the largest logit, the lowest id on ties; no draw. */
  const float logits[3 * 4] = {0.5f, 2.0f, 2.0f, -1.0f, /* tie: 1 */
                               -3.0f, -2.0f, -1.0f, -0.5f, 7.0f, 0.0f, 7.0f, 7.0f};
  int64_t tok[3] = {-1, -1, -1};
  uint64_t state = 5;
  expect("modec_pick_tokens(greedy)", modec_pick_tokens(logits, 3, 4, &c, &state, NULL, tok), MODEC_OK, NULL);
  check(tok[0] == 1 && tok[1] == 3 && tok[2] == 0 && state == 5, "greedy: argmax, lowest id on ties, no draw");
  /* Sampling: one draw per unfinished row; finished rows keep their token and draw nothing. */
  c.temperature = 1.0;
  const uint8_t finished[3] = {0, 1, 0};
  tok[1] = 42;
  state = 7;
  expect("modec_pick_tokens(sampling)", modec_pick_tokens(logits, 3, 4, &c, &state, finished, tok), MODEC_OK, NULL);
  check(state == 7 + 2 * GOLDEN && tok[1] == 42 && tok[0] >= 0 && tok[0] < 4 && tok[2] >= 0 && tok[2] < 4,
        "sampling: one draw per unfinished row, finished rows untouched");
  /* The first SplitMix64 output of seed 0 is 0xE220A8397B1DCDAF, u = 0.8833...: over two equal
   * logits (p = 1, 1; S = 2) the first candidate whose cumulative p exceeds 2u is id 1. */
  const float two[2] = {3.0f, 3.0f};
  state = 0;
  modec_pick_tokens(two, 1, 2, &c, &state, NULL, tok);
  check(tok[0] == 1, "sampling: SplitMix64 seed 0 draws u = 0.883 (docs/generation.md)");
  /* top_k 1 is greedy (no draw); a tiny top_p keeps the top token only (one draw). */
  c.top_k = 1;
  state = 0;
  modec_pick_tokens(logits, 1, 4, &c, &state, NULL, tok);
  check(tok[0] == 1 && state == 0, "top_k 1: greedy, no draw");
  c.top_k = 0;
  c.top_p = 1e-9;
  int same = 1;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    state = seed;
    modec_pick_tokens(logits + 8, 1, 4, &c, &state, NULL, tok);
    same &= tok[0] == 0 && state == seed + GOLDEN;
  }
  check(same, "top_p 1e-9: the most likely token (ties: the lowest id), one draw");
  /* Bad settings and arguments. */
  modec_generation_config bad = c;
  bad.temperature = -1.0;
  expect("modec_pick_tokens(temperature -1)", modec_pick_tokens(logits, 1, 4, &bad, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "temperature");
  bad = c;
  bad.temperature = 0.0 / 0.0;
  expect("modec_pick_tokens(temperature NaN)", modec_pick_tokens(logits, 1, 4, &bad, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "temperature");
  bad = c;
  bad.top_p = 0.0;
  expect("modec_pick_tokens(top_p 0)", modec_pick_tokens(logits, 1, 4, &bad, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "top_p");
  bad.top_p = 1.5;
  expect("modec_pick_tokens(top_p 1.5)", modec_pick_tokens(logits, 1, 4, &bad, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "top_p");
  bad = c;
  bad.top_k = -1;
  expect("modec_pick_tokens(top_k -1)", modec_pick_tokens(logits, 1, 4, &bad, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "top_k");
  expect("modec_pick_tokens(NULL config)", modec_pick_tokens(logits, 1, 4, NULL, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_pick_tokens(vocab 0)", modec_pick_tokens(logits, 1, 0, &c, &state, NULL, tok),
         MODEC_ERR_INVALID_ARGUMENT, "vocab");
  const float nan_row[2] = {1.0f, 0.0f / 0.0f};
  expect("modec_pick_tokens(NaN logits)", modec_pick_tokens(nan_row, 1, 2, &c, &state, NULL, tok), MODEC_ERR_RUNTIME,
         "NaN");
  /* The generation handle's NULL cases. */
  const float* lp = NULL;
  size_t nb = 0, nv = 0;
  expect("modec_generation_logits(NULL)", modec_generation_logits(NULL, &lp, &nb, &nv), MODEC_ERR_INVALID_ARGUMENT,
         "NULL");
  expect("modec_decode_step(NULL)", modec_decode_step(NULL, tok, 1), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_generate(NULL session)", modec_generate(NULL, NULL, 0, &c, NULL, NULL, NULL, NULL),
         MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_generate_from(NULL)", modec_generate_from(NULL, &c, NULL, NULL, NULL, NULL),
         MODEC_ERR_INVALID_ARGUMENT, "NULL");
  modec_generation* g = (modec_generation*)(void*)&state;
  expect("modec_prefill(NULL session)", modec_prefill(NULL, NULL, 0, &g), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  check(g == NULL, "a failed modec_prefill sets *out to NULL");
  check(modec_generation_cache_length(NULL) == 0, "modec_generation_cache_length(NULL) == 0");
  modec_generation_free(NULL);
  check(1, "modec_generation_free(NULL)");
}

static int thread_body(void* arg) {
  (void)arg;
  modec_session* s = NULL;
  modec_status st = modec_open(NULL, NULL, &s);
  return st == MODEC_ERR_INVALID_ARGUMENT && one_line(modec_last_error()) ? 0 : 1;
}

static void check_open_errors(const char* dir) {
  modec_session* s = NULL;
  expect("modec_open(NULL dir)", modec_open(NULL, "cpu", &s), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_open(NULL out)", modec_open(dir ? dir : ".", "cpu", NULL), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_open(device \"tpu\")", modec_open(dir ? dir : ".", "tpu", &s), MODEC_ERR_INVALID_ARGUMENT,
         "'tpu'");
  check(s == NULL, "a failed modec_open leaves *out NULL");
  expect("modec_open(device \"\")", modec_open(dir ? dir : ".", "", &s), MODEC_ERR_INVALID_ARGUMENT, "device");
  expect("modec_open(missing dir)", modec_open("/nonexistent/modec-artifact", NULL, &s), MODEC_ERR_IO,
         "/nonexistent/modec-artifact/manifest.json cannot be opened");
  /* A path with a line break still gives a one-line message. */
  expect("modec_open(missing dir with a line break in its name)", modec_open("/nonexistent/a\nb", NULL, &s),
         MODEC_ERR_IO, "cannot be opened");
  if (dir != NULL) {
    expect("modec_open(device \"cuda\")", modec_open(dir, "cuda", &s), MODEC_ERR_TARGET, "cuda");
    check(s == NULL, "modec_open(cuda) leaves *out NULL");
  }

  /* modec_last_error() is per thread: an error in another thread does not show here. */
  expect("modec_open(missing dir) before the thread", modec_open("/nonexistent/x", NULL, &s), MODEC_ERR_IO,
         "cannot be opened");
  char before[512];
  snprintf(before, sizeof before, "%s", modec_last_error());
  thrd_t t;
  int rc = -1;
  if (thrd_create(&t, thread_body, NULL) == thrd_success) thrd_join(t, &rc);
  check(rc == 0, "a thread gets its own error and message");
  check(strcmp(before, modec_last_error()) == 0, "modec_last_error() is per thread");
}

static void check_info(modec_session* s) {
  modec_tensor info;
  size_t ni = modec_num_inputs(s), no = modec_num_outputs(s);
  check(ni >= 1 && no >= 1, "the model has inputs and outputs");
  expect("modec_input_info(s, 0)", modec_input_info(s, 0, &info), MODEC_OK, NULL);
  check(info.name != NULL && info.name[0] && info.ndim >= 0 && (info.ndim == 0 || info.shape != NULL) &&
            info.data == NULL && modec_dtype_size(info.dtype) > 0,
        "modec_input_info fills name, dtype, rank, shape");
  expect("modec_output_info(s, 0)", modec_output_info(s, 0, &info), MODEC_OK, NULL);
  expect("modec_input_info(NULL session)", modec_input_info(NULL, 0, &info), MODEC_ERR_INVALID_ARGUMENT,
         "modec_input_info");
  expect("modec_input_info(index == count)", modec_input_info(s, ni, &info), MODEC_ERR_INVALID_ARGUMENT,
         "out of range");
  expect("modec_input_info(NULL info)", modec_input_info(s, 0, NULL), MODEC_ERR_INVALID_ARGUMENT,
         "modec_input_info");
  expect("modec_output_info(NULL session)", modec_output_info(NULL, 0, &info), MODEC_ERR_INVALID_ARGUMENT,
         "modec_output_info");
  expect("modec_output_info(index == count)", modec_output_info(s, no, &info), MODEC_ERR_INVALID_ARGUMENT,
         "out of range");
  expect("modec_output_info(NULL info)", modec_output_info(s, 0, NULL), MODEC_ERR_INVALID_ARGUMENT,
         "modec_output_info");
}

/* A successful run; checks the outputs against modec_output_info. Returns the number of bytes
 * of output 0 copied into *copy (malloc'd) or 0 on failure. */
static size_t run_ok(modec_session* s, Inputs* in, const char* what, void** copy) {
  modec_tensor outs[MAX_OUT];
  size_t n = MAX_OUT;
  modec_status st = modec_run(s, in->t, in->n, outs, &n);
  expect(what, st, MODEC_OK, NULL);
  if (st != MODEC_OK) return 0;
  int ok = n == modec_num_outputs(s);
  size_t bytes0 = 0;
  for (size_t i = 0; ok && i < n; ++i) {
    modec_tensor info;
    ok = modec_output_info(s, i, &info) == MODEC_OK && outs[i].name != NULL && strcmp(outs[i].name, info.name) == 0 &&
         outs[i].dtype == info.dtype && outs[i].ndim == info.ndim && outs[i].data != NULL;
    size_t numel = 1;
    for (int32_t d = 0; ok && d < outs[i].ndim; ++d) {
      ok = info.shape[d] < 0 ? outs[i].shape[d] >= 1 : outs[i].shape[d] == info.shape[d];
      numel *= (size_t)outs[i].shape[d];
    }
    if (ok && outs[i].dtype == MODEC_FLOAT32) {
      const float* f = (const float*)outs[i].data;
      for (size_t k = 0; ok && k < numel; ++k) ok = f[k] == f[k] && f[k] > -1e30f && f[k] < 1e30f;
    }
    if (i == 0) bytes0 = numel * modec_dtype_size(outs[0].dtype);
  }
  char name[256];
  snprintf(name, sizeof name, "%s: outputs match modec_output_info (names, dtypes, shapes, finite)", what);
  check(ok, name);
  if (!ok || copy == NULL) return ok ? bytes0 : 0;
  *copy = malloc(bytes0);
  if (*copy) memcpy(*copy, outs[0].data, bytes0);
  return *copy ? bytes0 : 0;
}

static modec_status run_with(modec_session* s, Inputs* in) {
  modec_tensor outs[MAX_OUT];
  size_t n = MAX_OUT;
  return modec_run(s, in->t, in->n, outs, &n);
}

static void check_run(modec_session* s, const char* dir) {
  Inputs in;
  if (!make_inputs(s, &in)) return;
  void* first = NULL;
  size_t bytes = run_ok(s, &in, "modec_run(valid inputs)", &first);

  /* The same inputs in reverse order (matched by name): the same result. */
  Inputs rev = in;
  for (size_t i = 0; i < in.n; ++i) rev.t[i] = in.t[in.n - 1 - i];
  modec_tensor outs[MAX_OUT];
  size_t n = MAX_OUT;
  expect("modec_run(inputs in reverse order)", modec_run(s, rev.t, rev.n, outs, &n), MODEC_OK, NULL);
  check(first != NULL && memcmp(first, outs[0].data, bytes) == 0, "same outputs in any input order");

  /* Outputs stay valid until the next run on that session: a second session does not touch them. */
  modec_session* s2 = NULL;
  expect("modec_open(second session)", modec_open(dir, "cpu", &s2), MODEC_OK, NULL);
  if (s2 != NULL) {
    Inputs in2;
    if (make_inputs(s2, &in2)) {
      run_ok(s2, &in2, "modec_run(second session)", NULL);
      free_inputs(&in2);
    }
    modec_close(s2);
  }
  check(first != NULL && memcmp(first, outs[0].data, bytes) == 0, "outputs survive another session's run");

  /* NULL arguments and too small an output array: MODEC_ERR_INVALID_ARGUMENT. */
  n = MAX_OUT;
  expect("modec_run(NULL session)", modec_run(NULL, in.t, in.n, outs, &n), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_run(NULL inputs, n > 0)", modec_run(s, NULL, in.n, outs, &n), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_run(NULL outputs)", modec_run(s, in.t, in.n, NULL, &n), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  expect("modec_run(NULL n_outputs)", modec_run(s, in.t, in.n, outs, NULL), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  n = modec_num_outputs(s) - 1;
  expect("modec_run(output array too small)", modec_run(s, in.t, in.n, outs, &n), MODEC_ERR_INVALID_ARGUMENT,
         "outputs array holds");

  Inputs bad;
  char what[256];
  const char* name0 = in.t[0].name;

  bad = in;
  bad.t[0].data = NULL;
  expect("modec_run(input data NULL)", run_with(s, &bad), MODEC_ERR_INVALID_ARGUMENT, "no data");
  if (in.t[0].ndim > 0) {
    bad = in;
    bad.t[0].shape = NULL;
    expect("modec_run(input shape NULL)", run_with(s, &bad), MODEC_ERR_INVALID_ARGUMENT, "no shape");
  }

  /* Wrong names, count, dtype, rank, dims: MODEC_ERR_INPUT. */
  bad = in;
  bad.n = in.n - 1;
  snprintf(what, sizeof what, "missing input '%s'", in.t[in.n - 1].name);
  expect("modec_run(one input left out)", run_with(s, &bad), MODEC_ERR_INPUT, what);
  n = MAX_OUT;
  expect("modec_run(no inputs)", modec_run(s, NULL, 0, outs, &n), MODEC_ERR_INPUT, "missing input");
  bad = in;
  bad.t[0].name = "no_such_input";
  expect("modec_run(unknown input name)", run_with(s, &bad), MODEC_ERR_INPUT, "unknown input 'no_such_input'");
  if (in.n < MAX_IN) {
    bad = in;
    bad.t[in.n] = in.t[0];
    bad.t[in.n].name = "extra";
    bad.n = in.n + 1;
    expect("modec_run(an extra input)", run_with(s, &bad), MODEC_ERR_INPUT, "unknown input 'extra'");
    bad = in;
    bad.t[in.n] = in.t[0];
    bad.n = in.n + 1;
    snprintf(what, sizeof what, "input '%s' given twice", name0);
    expect("modec_run(an input given twice)", run_with(s, &bad), MODEC_ERR_INPUT, what);
  }
  bad = in;
  bad.t[0].name = NULL;
  expect("modec_run(input name NULL)", run_with(s, &bad), MODEC_ERR_INPUT, "no name");

  bad = in;
  bad.t[0].dtype = in.t[0].dtype == MODEC_FLOAT32 ? MODEC_INT32 : MODEC_FLOAT32;
  snprintf(what, sizeof what, "input '%s' dtype", name0);
  expect("modec_run(wrong dtype)", run_with(s, &bad), MODEC_ERR_INPUT, what);
  bad = in;
  bad.t[0].dtype = (modec_dtype)99;
  expect("modec_run(dtype not in the enum)", run_with(s, &bad), MODEC_ERR_INPUT, "dtype");

  bad = in;
  bad.t[0].ndim = in.t[0].ndim + 1; /* shape[ndim] is 1: same element count */
  snprintf(what, sizeof what, "input '%s' has rank %d, expected %d", name0, (int)in.t[0].ndim + 1,
           (int)in.t[0].ndim);
  expect("modec_run(rank + 1)", run_with(s, &bad), MODEC_ERR_INPUT, what);
  if (in.t[0].ndim > 0) {
    bad = in;
    bad.t[0].ndim = in.t[0].ndim - 1;
    expect("modec_run(rank - 1)", run_with(s, &bad), MODEC_ERR_INPUT, "rank");
    bad = in;
    bad.t[0].ndim = -1;
    expect("modec_run(negative rank)", run_with(s, &bad), MODEC_ERR_INPUT, "rank");
  }

  modec_tensor info0;
  modec_input_info(s, 0, &info0);
  int64_t shp[MAX_DIM + 1];
  for (int32_t d = 0; d < in.t[0].ndim; ++d) {
    memcpy(shp, in.shape[0], sizeof shp);
    bad = in;
    bad.t[0].shape = shp;
    shp[d] = 0;
    snprintf(what, sizeof what, "input '%s' dim %d is 0", name0, (int)d);
    expect("modec_run(a dim is 0)", run_with(s, &bad), MODEC_ERR_INPUT, what);
    shp[d] = -3;
    expect("modec_run(a dim is negative)", run_with(s, &bad), MODEC_ERR_INPUT, "must be >= 1");
    if (info0.shape[d] >= 0) { /* a static dim: any other size is refused */
      shp[d] = info0.shape[d] + 1;
      snprintf(what, sizeof what, "input '%s' dim %d is %lld, expected %lld", name0, (int)d,
               (long long)shp[d], (long long)info0.shape[d]);
      expect("modec_run(static dim differs)", run_with(s, &bad), MODEC_ERR_INPUT, what);
    }
  }
  /* Two inputs sharing a symbol (modec models share the batch dim B) must agree on it. */
  if (in.n >= 2 && in.t[0].ndim > 0 && in.t[1].ndim > 0 && info0.shape[0] < 0) {
    modec_tensor info1;
    modec_input_info(s, 1, &info1);
    if (info1.shape[0] < 0) {
      memcpy(shp, in.shape[1], sizeof shp);
      shp[0] = SYM + 1;
      bad = in;
      bad.t[1].shape = shp;
      expect("modec_run(shared symbolic dim differs)", run_with(s, &bad), MODEC_ERR_INPUT, "another input has");
    }
  }

  /* Errors leave the session usable; a success clears the message. */
  void* again = NULL;
  size_t bytes2 = run_ok(s, &in, "modec_run(valid inputs) after the errors", &again);
  check(bytes2 == bytes && first && again && memcmp(first, again, bytes) == 0, "same outputs after the errors");
  free(first);
  free(again);
  free_inputs(&in);
}

/* ---- generation ------------------------------------------------------------------------- */

static int is_past(const char* name) { return strncmp(name, "past_key_values.", 16) == 0; }

/* An artifact without a KV cache refuses every generation call. */
static void check_no_generation(modec_session* s) {
  Inputs in;
  if (!make_inputs(s, &in)) return;
  modec_generation_config c;
  modec_generation_config_default(&c);
  int32_t len[MAX_IN];
  expect("modec_generate(no KV cache)", modec_generate(s, in.t, in.n, &c, NULL, NULL, NULL, len),
         MODEC_ERR_INVALID_ARGUMENT, "the artifact has no KV cache: export the model with past_key_values inputs");
  modec_generation* g = (modec_generation*)(void*)&c;
  expect("modec_prefill(no KV cache)", modec_prefill(s, in.t, in.n, &g), MODEC_ERR_INVALID_ARGUMENT,
         "has no KV cache");
  check(g == NULL, "modec_prefill(no KV cache) sets *out to NULL");
  free_inputs(&in);
}

/* The prompt: valid inputs (every symbolic dim SYM, every element 1) without the cache. */
static int make_prompt(const modec_session* s, Inputs* in) {
  if (!make_inputs(s, in)) return 0;
  size_t k = 0;
  for (size_t i = 0; i < in->n; ++i) {
    if (is_past(in->t[i].name)) {
      free(in->data[i]);
      continue;
    }
    in->t[k] = in->t[i];
    in->data[k] = in->data[i];
    memcpy(in->shape[k], in->shape[i], sizeof in->shape[k]);
    in->t[k].shape = in->shape[k];
    ++k;
  }
  in->n = k;
  return 1;
}

typedef struct {
  size_t calls, stop_at, batch;
  int64_t tokens[MAX_OUT][64];
  uint8_t finished[MAX_OUT][64];
} Stream;

static int on_token(void* user, size_t step, const int64_t* tokens, const uint8_t* finished, size_t batch) {
  Stream* st = (Stream*)user;
  st->batch = batch;
  for (size_t b = 0; b < batch && b < MAX_OUT && step < 64; ++b) {
    st->tokens[b][step] = tokens[b];
    st->finished[b][step] = finished[b];
  }
  ++st->calls;
  return st->stop_at != 0 && step + 1 >= st->stop_at;
}

/* The loop of docs/generation.md written with the low-level calls; returns the status of the
 * first failing call. */
static modec_status manual_loop(modec_session* s, Inputs* in, const modec_generation_config* c, int64_t* out,
                                int32_t* lengths, size_t* batch_out) {
  modec_generation* g = NULL;
  modec_status st = modec_prefill(s, in->t, in->n, &g);
  if (st != MODEC_OK) return st;
  const float* logits = NULL;
  size_t batch = 0, vocab = 0;
  modec_generation_logits(g, &logits, &batch, &vocab);
  *batch_out = batch;
  int64_t tok[MAX_OUT];
  uint8_t done[MAX_OUT];
  uint64_t state = c->seed;
  size_t n = (size_t)c->max_new_tokens;
  for (size_t b = 0; b < batch; ++b) lengths[b] = 0, done[b] = 0, tok[b] = 0;
  for (size_t step = 0; step < n && st == MODEC_OK; ++step) {
    st = modec_pick_tokens(logits, batch, vocab, c, &state, done, tok);
    int all = 1;
    for (size_t b = 0; b < batch && st == MODEC_OK; ++b) {
      if (!done[b]) {
        out[b * n + (size_t)lengths[b]++] = tok[b];
        done[b] = (size_t)lengths[b] == n;
        for (size_t k = 0; k < c->n_stop_tokens; ++k) done[b] |= tok[b] == c->stop_tokens[k];
      }
      all &= done[b];
    }
    if (all || st != MODEC_OK) break;
    size_t before = modec_generation_cache_length(g);
    st = modec_decode_step(g, tok, batch);
    if (st == MODEC_OK && modec_generation_cache_length(g) != before + 1) st = MODEC_ERR_RUNTIME;
    modec_generation_logits(g, &logits, &batch, &vocab);
  }
  modec_generation_free(g);
  return st;
}

static void check_generate(modec_session* s) {
  Inputs in;
  if (!make_prompt(s, &in)) return;
  enum { N = 6 };
  modec_generation_config c;
  modec_generation_config_default(&c);
  c.max_new_tokens = N;
  int64_t out[MAX_OUT * N], ref[MAX_OUT * N];
  int32_t len[MAX_OUT], ref_len[MAX_OUT];
  size_t batch = 0;

  /* The prefill: batch SYM, the prompt's SYM positions in the cache, finite logits. */
  modec_generation* g = NULL;
  expect("modec_prefill(prompt)", modec_prefill(s, in.t, in.n, &g), MODEC_OK, NULL);
  const float* logits = NULL;
  size_t vocab = 0;
  expect("modec_generation_logits", modec_generation_logits(g, &logits, &batch, &vocab), MODEC_OK, NULL);
  int finite = logits != NULL && vocab > 1;
  for (size_t k = 0; finite && k < batch * vocab; ++k) finite = logits[k] == logits[k] && logits[k] < 1e30f;
  check(batch == SYM && modec_generation_cache_length(g) == SYM && finite,
        "modec_prefill: batch and cache length of the prompt, finite logits");
  int64_t three[3] = {1, 1, 1};
  expect("modec_decode_step(3 tokens for 2 rows)", modec_decode_step(g, three, 3), MODEC_ERR_INVALID_ARGUMENT,
         "3 tokens, the generation has 2 rows");
  expect("modec_decode_step(NULL tokens)", modec_decode_step(g, NULL, 2), MODEC_ERR_INVALID_ARGUMENT, "NULL");
  check(modec_generation_cache_length(g) == SYM, "a refused step leaves the generation as it was");

  /* modec_run with an empty cache (P = 0, NULL data) is the prefill. */
  Inputs full;
  if (make_inputs(s, &full)) {
    for (size_t i = 0; i < full.n; ++i) {
      if (is_past(full.t[i].name)) {
        full.shape[i][2] = 0;
        full.t[i].data = NULL;
      }
    }
    modec_tensor outs[MAX_OUT];
    size_t n = MAX_OUT;
    expect("modec_run(P = 0 cache)", modec_run(s, full.t, full.n, outs, &n), MODEC_OK, NULL);
    int same = n > 0 && outs[0].ndim == 3 && (size_t)outs[0].shape[2] == vocab;
    for (size_t b = 0; same && b < batch; ++b) {
      size_t seq = (size_t)outs[0].shape[1];
      const float* last = (const float*)outs[0].data + (b * seq + seq - 1) * vocab;
      same = memcmp(last, logits + b * vocab, vocab * sizeof(float)) == 0;
    }
    check(same, "modec_run(P = 0 cache): its last position's logits are the prefill's");
    for (size_t i = 0; i < full.n; ++i) {
      if (!is_past(full.t[i].name)) continue;
      for (int d = 0; d < 4; ++d) {
        if (d == 2) continue;
        int64_t keep = full.shape[i][d];
        full.shape[i][d] = 0;
        char what[160];
        snprintf(what, sizeof what, "input '%s' dim %d is 0", full.t[i].name, d);
        expect("modec_run(a cache dim other than the past length is 0)", run_with(s, &full), MODEC_ERR_INPUT, what);
        full.shape[i][d] = keep;
      }
      break;
    }
    for (size_t i = 0; i < full.n; ++i) full.t[i].data = full.data[i];
    free_inputs(&full);
  }
  modec_generation_free(g);

  /* modec_generate equals the loop written with the low-level calls: greedy, then sampled. */
  Stream st;
  memset(&st, 0, sizeof st);
  expect("modec_generate(greedy)", modec_generate(s, in.t, in.n, &c, on_token, &st, out, len), MODEC_OK, NULL);
  expect("prefill / pick / decode-step loop (greedy)", manual_loop(s, &in, &c, ref, ref_len, &batch), MODEC_OK, NULL);
  int same = batch == SYM && st.calls == N && st.batch == SYM;
  for (size_t b = 0; same && b < batch; ++b) {
    same = len[b] == N && ref_len[b] == N && memcmp(out + b * N, ref + b * N, N * sizeof(int64_t)) == 0;
    for (size_t k = 0; same && k < N; ++k) {
      same = out[b * N + k] >= 0 && (size_t)out[b * N + k] < vocab && st.tokens[b][k] == out[b * N + k] &&
             st.finished[b][k] == (k == N - 1);
    }
  }
  check(same, "modec_generate(greedy) == the low-level loop; the callback streamed every token");
  modec_generation_config sc = c;
  sc.temperature = 1.3;
  sc.top_k = 20;
  sc.top_p = 0.95;
  sc.seed = 12345;
  memset(&st, 0, sizeof st);
  expect("modec_generate(sampled)", modec_generate(s, in.t, in.n, &sc, on_token, &st, out, len), MODEC_OK, NULL);
  expect("prefill / pick / decode-step loop (sampled)", manual_loop(s, &in, &sc, ref, ref_len, &batch), MODEC_OK,
         NULL);
  same = 1;
  for (size_t b = 0; b < batch; ++b) {
    same &= len[b] == N && ref_len[b] == N && memcmp(out + b * N, ref + b * N, N * sizeof(int64_t)) == 0;
  }
  check(same, "modec_generate(sampled) == the low-level loop with modec_pick_tokens");

  /* The callback stops the generation: the tokens so far, the rest -1. */
  memset(&st, 0, sizeof st);
  st.stop_at = 2;
  expect("modec_generate(callback stops at step 1)", modec_generate(s, in.t, in.n, &c, on_token, &st, out, len),
         MODEC_OK, NULL);
  same = st.calls == 2;
  for (size_t b = 0; b < batch; ++b) same &= len[b] == 2 && out[b * N + 2] == -1 && out[b * N + N - 1] == -1;
  check(same, "the callback's non-zero return stops the generation after its step");

  /* A stop token ends its row and is kept; max_new_tokens 0 runs the prefill only. */
  manual_loop(s, &in, &c, ref, ref_len, &batch); /* greedy: row 0's first token is the stop token */
  int64_t first = ref[0];
  modec_generation_config stop = c;
  stop.stop_tokens = &first;
  stop.n_stop_tokens = 1;
  memset(&st, 0, sizeof st);
  expect("modec_generate(stop token)", modec_generate(s, in.t, in.n, &stop, on_token, &st, out, len), MODEC_OK, NULL);
  check(len[0] == 1 && out[0] == first && out[1] == -1 && st.finished[0][0] == 1,
        "a stop token ends its row and is kept as its last token");
  c.max_new_tokens = 0;
  memset(&st, 0, sizeof st);
  len[0] = len[1] = 99;
  expect("modec_generate(max_new_tokens 0)", modec_generate(s, in.t, in.n, &c, on_token, &st, out, len), MODEC_OK,
         NULL);
  check(len[0] == 0 && len[1] == 0 && st.calls == 0, "max_new_tokens 0: no token, no callback");

  /* Bad settings, bad prompts. */
  c.max_new_tokens = -1;
  expect("modec_generate(max_new_tokens -1)", modec_generate(s, in.t, in.n, &c, NULL, NULL, NULL, NULL),
         MODEC_ERR_INVALID_ARGUMENT, "max_new_tokens is -1");
  c.max_new_tokens = 2;
  c.n_stop_tokens = 1;
  expect("modec_generate(stop_tokens NULL, n 1)", modec_generate(s, in.t, in.n, &c, NULL, NULL, NULL, NULL),
         MODEC_ERR_INVALID_ARGUMENT, "stop_tokens is NULL");
  c.n_stop_tokens = 0;
  expect("modec_generate(NULL config)", modec_generate(s, in.t, in.n, NULL, NULL, NULL, NULL, NULL),
         MODEC_ERR_INVALID_ARGUMENT, "NULL");
  Inputs bad = in;
  bad.n = in.n - 1;
  expect("modec_prefill(an input left out)", modec_prefill(s, bad.t, bad.n, &g), MODEC_ERR_INPUT, "missing input");
  check(g == NULL, "a failed modec_prefill sets *out to NULL");
  Inputs cached;
  if (make_inputs(s, &cached)) {
    expect("modec_prefill(the cache given)", modec_prefill(s, cached.t, cached.n, &g), MODEC_ERR_INPUT,
           "is the KV cache, which generation starts empty");
    free_inputs(&cached);
  }
  for (size_t i = 0; i < in.n; ++i) {
    if (strcmp(in.t[i].name, "attention_mask") == 0) {
      int64_t shp[2] = {SYM, SYM + 1};
      bad = in;
      bad.t[i].shape = shp;
      expect("modec_prefill(mask longer than the prompt)", modec_prefill(s, bad.t, bad.n, &g), MODEC_ERR_INPUT,
             "attention_mask");
    }
  }
  free_inputs(&in);
}

static int usage(void) {
  fprintf(stderr, "usage: c_api_test --no-artifact | DIR [--open|--run STATUS [TEXT]] | DIR --generate\n");
  return 2;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) return usage();
  check_static_api();
  check_pick_tokens();
  if (argc == 3 && strcmp(argv[2], "--generate") == 0) {
    modec_session* s = NULL;
    expect("modec_open(artifact with a KV cache)", modec_open(argv[1], "cpu", &s), MODEC_OK, NULL);
    if (s != NULL) {
      check_generate(s);
      modec_close(s);
    }
  } else if (strcmp(argv[1], "--no-artifact") == 0) {
    if (argc != 2) return usage();
    check_open_errors(NULL);
  } else if (argc == 2) {
    const char* dir = argv[1];
    check_open_errors(dir);
    modec_session* s = NULL;
    expect("modec_open(dir, NULL device = cpu)", modec_open(dir, NULL, &s), MODEC_OK, NULL);
    modec_close(s);
    s = NULL;
    expect("modec_open(dir, \"cpu\")", modec_open(dir, "cpu", &s), MODEC_OK, NULL);
    if (s != NULL) {
      check_info(s);
      check_run(s, dir);
      check_no_generation(s);
      modec_close(s);
    }
  } else if (argc >= 4 && argc <= 5 && (strcmp(argv[2], "--open") == 0 || strcmp(argv[2], "--run") == 0)) {
    modec_status want;
    if (!parse_status(argv[3], &want)) return usage();
    const char* needle = argc == 5 ? argv[4] : NULL;
    char sentinel;
    modec_session* s = (modec_session*)(void*)&sentinel; /* must be overwritten */
    modec_status st = modec_open(argv[1], "cpu", &s);
    if (strcmp(argv[2], "--open") == 0) {
      expect("modec_open(artifact)", st, want, needle);
      if (want != MODEC_OK) check(s == NULL, "a failed modec_open sets *out to NULL");
      if (st == MODEC_OK && s != (modec_session*)(void*)&sentinel) modec_close(s);
    } else {
      expect("modec_open(artifact)", st, MODEC_OK, NULL);
      if (st == MODEC_OK) {
        Inputs in;
        if (make_inputs(s, &in)) {
          expect("modec_run(valid inputs)", run_with(s, &in), want, needle);
          free_inputs(&in);
        }
        modec_close(s);
      }
    }
  } else {
    return usage();
  }
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail == 0 ? 0 : 1;
}
