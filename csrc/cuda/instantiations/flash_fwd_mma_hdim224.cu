// Tensor-core forward, head-dim bucket 224 (one translation unit per bucket: parallel builds).
#include "cuda/flash_fwd_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_fwd_mma<__half, 224>(const FwdArgs&, cudaStream_t);
template void launch_fwd_mma<__nv_bfloat16, 224>(const FwdArgs&, cudaStream_t);
template FwdOccupancy fwd_mma_occupancy<__half, 224>(const FwdArgs&);
template FwdOccupancy fwd_mma_occupancy<__nv_bfloat16, 224>(const FwdArgs&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
