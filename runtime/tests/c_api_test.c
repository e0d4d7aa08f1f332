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

static int usage(void) {
  fprintf(stderr, "usage: c_api_test --no-artifact | DIR [--open|--run STATUS [TEXT]]\n");
  return 2;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) return usage();
  check_static_api();
  if (strcmp(argv[1], "--no-artifact") == 0) {
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
