{
  description = "Flake for the flash-attn kernel (FlashAttention for the Kernel Hub)";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  # Hugging Face's kernel-builder reads build.toml from `path` and derives the op-namespace uid
  # from `self` (its git revision), so `nix build` and `kernel-builder build-and-upload` work here
  # as on any kernels-community repository.
  outputs =
    {
      self,
      kernel-builder,
    }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}
