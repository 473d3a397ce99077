// Hopper forward and decode, head-dim bucket 192 (sm90a code only; other targets get empty kernels
// that flash_fwd.cu never launches).
#include "cuda/hopper/flash_decode_tma.cuh"
#include "cuda/hopper/flash_fwd_wgmma.cuh"

namespace flash {
namespace cuda {
namespace detail {
template void launch_fwd_wgmma<__half, 192>(const FwdArgs&, cudaStream_t);
template void launch_fwd_wgmma<__nv_bfloat16, 192>(const FwdArgs&, cudaStream_t);
template FwdOccupancy fwd_wgmma_occupancy<__half, 192>(const FwdArgs&);
template FwdOccupancy fwd_wgmma_occupancy<__nv_bfloat16, 192>(const FwdArgs&);
template bool launch_fwd_decode_tma<__half, 192>(const FwdArgs&, cudaStream_t);
template bool launch_fwd_decode_tma<__nv_bfloat16, 192>(const FwdArgs&, cudaStream_t);
template FwdOccupancy fwd_decode_tma_occupancy<__half, 192>(const FwdArgs&);
template FwdOccupancy fwd_decode_tma_occupancy<__nv_bfloat16, 192>(const FwdArgs&);
}  // namespace detail
}  // namespace cuda
}  // namespace flash
