// c10/cuda includes of the CUDA op glue (route_cuda_op.cpp). Only the
// c10/cuda stream, guard and error check are used, not ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS/cuSPARSE headers the ops do not need; the lighter set also compiles against the
// headers a CPU-only torch ships (tests/ops/test_cuda_compile.py checks it on such a machine).
#pragma once

// A CPU-only torch ships c10/cuda headers without the CMake-generated cuda_cmake_macros.h.
// On Linux that file only defines the Windows DLL export switch, so going without it changes
// nothing; a CUDA torch has the file and takes the normal path.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
