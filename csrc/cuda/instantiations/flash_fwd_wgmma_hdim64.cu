// Hopper forward, head-dim bucket 64 (sm90a code only; other targets get an empty kernel that
// flash_fwd.cu never launches).
#include "cuda/hopper/flash_fwd_wgmma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_fwd_wgmma<__half, 64>(const FwdArgs&, cudaStream_t);
template void launch_fwd_wgmma<__nv_bfloat16, 64>(const FwdArgs&, cudaStream_t);
template FwdOccupancy fwd_wgmma_occupancy<__half, 64>(const FwdArgs&);
template FwdOccupancy fwd_wgmma_occupancy<__nv_bfloat16, 64>(const FwdArgs&);
// FP8 (e4m3 in, bfloat16 out): tile widths 64, 128 and 256 only.
template void launch_fwd_wgmma<__nv_fp8_e4m3, 64>(const FwdArgs&, cudaStream_t);
template FwdOccupancy fwd_wgmma_occupancy<__nv_fp8_e4m3, 64>(const FwdArgs&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
