// Hopper backward, head-dim bucket 256 (sm90a code only; other targets get an empty kernel that
// flash_bwd.cu never launches).
#include "cuda/hopper/flash_bwd_wgmma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_bwd_wgmma<__half, 256>(const BwdArgs&, cudaStream_t);
template void launch_bwd_wgmma<__nv_bfloat16, 256>(const BwdArgs&, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
