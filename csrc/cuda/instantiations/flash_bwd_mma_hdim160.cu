// Tensor-core backward, head-dim bucket 160 (one translation unit per bucket: parallel builds).
#include "cuda/flash_bwd_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_bwd_mma<__half, 160>(const BwdArgs&, cudaStream_t);
template void launch_bwd_mma<__nv_bfloat16, 160>(const BwdArgs&, cudaStream_t);
template bool bwd_mma_covers<160>(const FlashBwdParams&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
