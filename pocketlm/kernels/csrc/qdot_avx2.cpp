// The qdot kernels for CPUs with AVX2 but no VNNI (see qdot.h); built with -mavx2 -mfma -mf16c.
#define QDOT_VNNI 0
#include "qdot_impl256.h"

namespace pocketlm::qdot {
const Kernels kAvx2 = {"avx2", &int4_block, &int8_block, &peak};
}
