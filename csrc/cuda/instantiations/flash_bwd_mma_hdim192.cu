// Tensor-core backward, head-dim bucket 192 (one translation unit per bucket: parallel builds).
#include "cuda/flash_bwd_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_bwd_mma<__half, 192>(const BwdArgs&, cudaStream_t);
template void launch_bwd_mma<__nv_bfloat16, 192>(const BwdArgs&, cudaStream_t);
template bool bwd_mma_covers<192>(const FlashBwdParams&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
