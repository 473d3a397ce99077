// Tensor-core backward, head-dim bucket 224 (one translation unit per bucket: parallel builds).
#include "cuda/flash_bwd_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_bwd_mma<__half, 224>(const BwdArgs&, cudaStream_t);
template void launch_bwd_mma<__nv_bfloat16, 224>(const BwdArgs&, cudaStream_t);
template bool bwd_mma_covers<224>(const FlashBwdParams&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
