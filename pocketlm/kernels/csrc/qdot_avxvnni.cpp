// The qdot kernels for CPUs with AVX-VNNI (256-bit dpbusd without AVX-512; see qdot.h); built with -mavxvnni.
#define QDOT_VNNI 1
#include "qdot_impl256.h"

namespace pocketlm::qdot {
const Kernels kAvxVnni = {"avxvnni", &int4_block, &int8_block, &peak};
}
