# Locate the TVM runtime shipped in the apache-tvm / apache-tvm-ffi Python wheels.
#
# Inputs (cache variables):
#   TVM_ROOT        directory of the `tvm` package (holds lib/libtvm_runtime.so); asked from
#                   Python when unset.
#   Python_EXECUTABLE  interpreter used for the questions (default: python3 on PATH).
# Result: the IMPORTED target modec::tvm_runtime (libtvm_runtime, libtvm_runtime_extra +
# tvm_ffi::shared, linked with
# --no-as-needed: with libtvm_ffi alone the VM segfaults, see DESIGN.md),
# ModecTVM_RUNTIME_DIRS (for rpath), ModecTVM_LIBRARIES (the three library files, which
# `cmake --install` copies into the prefix) and ModecTVM_LICENSE_FILES (the wheels' license
# and notice files, entries DIST|SUBDIR|FILE, installed with them).

if(NOT Python_EXECUTABLE)
  find_program(Python_EXECUTABLE NAMES python3 python REQUIRED)
endif()

if(NOT tvm_ffi_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m tvm_ffi.config --cmakedir
    OUTPUT_VARIABLE _modec_ffi_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "modec: `${Python_EXECUTABLE} -m tvm_ffi.config --cmakedir` failed; "
                        "install apache-tvm or pass -Dtvm_ffi_DIR=...")
  endif()
  set(tvm_ffi_DIR "${_modec_ffi_dir}" CACHE PATH "tvm_ffi CMake config directory")
endif()
find_package(tvm_ffi CONFIG REQUIRED)

if(NOT TVM_ROOT)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import os, importlib.util as u; print(os.path.dirname(u.find_spec('tvm').origin))"
    OUTPUT_VARIABLE _modec_tvm_root OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "modec: cannot find the tvm Python package; pass -DTVM_ROOT=<dir of tvm>")
  endif()
  set(TVM_ROOT "${_modec_tvm_root}" CACHE PATH "directory of the tvm Python package")
endif()

find_library(MODEC_TVM_RUNTIME_LIB NAMES tvm_runtime PATHS "${TVM_ROOT}/lib" NO_DEFAULT_PATH)
if(NOT MODEC_TVM_RUNTIME_LIB)
  message(FATAL_ERROR "modec: libtvm_runtime.so not found under ${TVM_ROOT}/lib; set TVM_ROOT")
endif()

# The wheel's runtime "extras" hold the contrib kernels compiled models call by name, among
# them tvm.contrib.sort.topk (the MoE router's top-k); without them a MoE artifact loads but
# fails at its first run.
find_library(MODEC_TVM_RUNTIME_EXTRA_LIB NAMES tvm_runtime_extra PATHS "${TVM_ROOT}/lib"
             NO_DEFAULT_PATH)
if(NOT MODEC_TVM_RUNTIME_EXTRA_LIB)
  message(FATAL_ERROR "modec: libtvm_runtime_extra.so not found under ${TVM_ROOT}/lib; set TVM_ROOT")
endif()

# find_package(tvm) is broken in the wheel (no tvmTargets.cmake): declare the libraries here.
add_library(modec_tvm_runtime_imported SHARED IMPORTED)
set_target_properties(modec_tvm_runtime_imported PROPERTIES IMPORTED_LOCATION "${MODEC_TVM_RUNTIME_LIB}")
add_library(modec_tvm_runtime_extra_imported SHARED IMPORTED)
set_target_properties(modec_tvm_runtime_extra_imported PROPERTIES
  IMPORTED_LOCATION "${MODEC_TVM_RUNTIME_EXTRA_LIB}")

add_library(modec_tvm_runtime INTERFACE)
target_link_libraries(modec_tvm_runtime INTERFACE
  "-Wl,--no-as-needed" modec_tvm_runtime_imported modec_tvm_runtime_extra_imported
  tvm_ffi::shared "-Wl,--as-needed")
add_library(modec::tvm_runtime ALIAS modec_tvm_runtime)

get_filename_component(_modec_rt_dir "${MODEC_TVM_RUNTIME_LIB}" DIRECTORY)
get_target_property(_modec_ffi_lib tvm_ffi::shared IMPORTED_LOCATION)
get_filename_component(_modec_ffi_dir "${_modec_ffi_lib}" DIRECTORY)
set(ModecTVM_RUNTIME_DIRS "${_modec_rt_dir};${_modec_ffi_dir}")
message(STATUS "modec: TVM runtime ${MODEC_TVM_RUNTIME_LIB}, tvm_ffi ${_modec_ffi_lib}")

set(ModecTVM_LIBRARIES "${MODEC_TVM_RUNTIME_LIB};${MODEC_TVM_RUNTIME_EXTRA_LIB};${_modec_ffi_lib}")

# Copies of the libraries are redistributed by `cmake --install`: so are the wheels' license
# and notice files (Apache-2.0 section 4). Empty when the wheels' metadata is not readable.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, re
from importlib import metadata
for dist in ("apache-tvm", "apache-tvm-ffi"):
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        continue
    for f in d.files or ():
        name = os.path.basename(str(f))
        if re.match(r"(LICEN[CS]E|NOTICE)", name, re.I) and os.path.isfile(f.locate()):
            sub = os.path.dirname(str(f)).replace("\\", "/")
            print(f"{dist}|{sub}|{os.path.realpath(f.locate())}")
]=]
  OUTPUT_VARIABLE _modec_licenses OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
set(ModecTVM_LICENSE_FILES "")
if(_rc EQUAL 0 AND _modec_licenses)
  string(REPLACE "\n" ";" ModecTVM_LICENSE_FILES "${_modec_licenses}")
else()
  message(WARNING "modec: the TVM wheels' license files were not found; `cmake --install` "
                  "copies the TVM libraries without them")
endif()
