// Tensor-core backward, head-dim bucket 224 (one translation unit per bucket: parallel builds).
#include "cuda/flash_bwd_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template bool launch_bwd_mma<__half, 224>(const BwdArgs&, cudaStream_t);
template bool launch_bwd_mma<__nv_bfloat16, 224>(const BwdArgs&, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
