"""transformers loads the published kernel as `attn_implementation="<org>/flash-attn"` and matches sdpa/eager.

Every model is a tiny random-weight model of a real architecture (tests/hf_support.py), saved with
save_pretrained and loaded back with from_pretrained, the loading path users take. The kernel is
published to an embedded repository in a temporary directory and reached through LOCAL_KERNELS.

Error convention (DESIGN.md, for whole models): the model running our kernel in bfloat16 is compared
with the reference model (attn_implementation "sdpa", or "eager" where sdpa lacks the feature:
softcap, sinks) in float32, by relative L2 error over the logits and over every parameter gradient.
The bound is what the same reference model makes in bfloat16 against its own float32 run:
    err(kernel bf16) <= 2 x err(reference bf16) + ABS_FLOOR   (logits)
    err(kernel bf16) <= 3 x err(reference bf16) + ABS_FLOOR   (gradients)
KernelCallSpy checks which kernel function each path really reached, with which arguments.
"""

from __future__ import annotations

import pytest

from hf_support import (ABS_FLOOR, ARCHS, REFERENCE_IMPL, VOCAB, KernelCallSpy, grad_vector, local_kernels, publish,
                        rel_err, save_tiny_model, tiny_config, transformers_skip_reason)

_reason = transformers_skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SEQLEN = 24
PACKED_LENGTHS = (9, 6, 11)  # three documents packed in one row; two are longer than the window


@pytest.fixture(scope="module")
def published(built_variants, tmp_path_factory):
    """The kernel published to a temporary embedded repository, loadable by its repo id."""
    kernel = publish(built_variants, tmp_path_factory.mktemp("hub"))
    with local_kernels(kernel, alias_repo(kernel.repo_id)):
        yield kernel


def alias_repo(repo_id: str) -> str:
    """The same kernel under a name transformers treats as flash-attn 2 (`<org>/<name>2`).

    transformers' continuous batching takes its flash_attn_with_kvcache decode path only for
    implementations whose name matches "flash...2" or "flash...3"; with `@v1` the version
    branch is named explicitly, so the "2" in the name does not make transformers ask for v3.
    """
    return repo_id + "2"


@pytest.fixture(autouse=True)
def vouch_for_gpt_oss(published, monkeypatch):
    """Lists our kernel among GPT-OSS's compatible flash implementations.

    transformers swaps any attn_implementation naming "flash" that a model with
    `_compatible_flash_implementations` (GPT-OSS: sinks) does not list for the first listed one
    (kernels-community/vllm-flash-attn3); listing a kernel there is how a model vouches for it.
    """
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssPreTrainedModel

    listed = GptOssPreTrainedModel._compatible_flash_implementations
    ours = [published.repo_id, alias_repo(published.repo_id) + "@v1"]
    monkeypatch.setattr(GptOssPreTrainedModel, "_compatible_flash_implementations", [*listed, *ours])


@pytest.fixture(scope="module")
def device(published):
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """arch -> directory of the saved tiny model."""
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(arch, root) for arch in ARCHS}


def load(path, impl: str, dtype: str, device: str, **config_overrides):
    """from_pretrained of a saved model with attention `impl`, in `dtype`, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=getattr(torch, dtype),
                                                 **config_overrides)
    return model.to(device).eval()


class Trio:
    """The model with our kernel in bf16, the reference in fp32 and the reference in bf16 (the bound)."""

    def __init__(self, path, repo_id: str, arch: str, device: str):
        ref = REFERENCE_IMPL.get(arch, "sdpa")
        self.kernel = load(path, repo_id, "bfloat16", device)
        self.ref32 = load(path, ref, "float32", device)
        self.ref16 = load(path, ref, "bfloat16", device)
        self.ref_impl = ref

    def run(self, fn):
        """fn(model) -> (output, loss) for each model, with gradients; returns outputs and grad vectors."""
        results = {}
        for name in ("kernel", "ref32", "ref16"):
            model = getattr(self, name)
            model.zero_grad(set_to_none=True)
            out, loss = fn(model)
            loss.backward()
            results[name] = (out.detach().float(), grad_vector(model))
        return results


def check_bounds(results, what: str) -> dict[str, float]:
    """Asserts DESIGN.md's bounds on outputs (2x) and gradients (3x); returns the error figures."""
    (out_k, g_k), (out_32, g_32), (out_16, g_16) = results["kernel"], results["ref32"], results["ref16"]
    fig = {"out": rel_err(out_k, out_32), "out_lowp": rel_err(out_16, out_32),
           "grad": rel_err(g_k, g_32), "grad_lowp": rel_err(g_16, g_32)}
    print(f"{what}: {fig}")
    assert fig["out"] <= 2 * fig["out_lowp"] + ABS_FLOOR, f"{what}: output error {fig}"
    assert fig["grad"] <= 3 * fig["grad_lowp"] + ABS_FLOOR, f"{what}: gradient error {fig}"
    return fig


def random_ids(batch: int, seqlen: int, device: str, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seqlen), generator=gen).to(device)


def expected_kwargs(arch: str) -> set[str]:
    """The feature arguments transformers must hand our kernel for `arch`."""
    wanted = {"softmax_scale", "causal"}
    if arch in ("gemma2", "gemma3", "gpt_oss"):
        wanted.add("window_size")
    if arch == "gemma2":
        wanted.add("softcap")
    if arch == "gpt_oss":
        wanted.add("s_aux")
    return wanted


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_forward_backward(published, model_dirs, device, arch, monkeypatch):
    """No mask: transformers calls flash_attn_func; logits and gradients match the reference."""
    trio = Trio(model_dirs[arch], published.repo_id, arch, device)
    spy = KernelCallSpy(monkeypatch)
    ids = random_ids(2, SEQLEN, device, seed=1)

    def step(model):
        out = model(ids, labels=ids)
        return out.logits, out.loss

    check_bounds(trio.run(step), f"{arch} dense")
    n_layers = trio.kernel.config.num_hidden_layers
    assert spy.calls == {"flash_attn_func": n_layers}
    assert expected_kwargs(arch) <= spy.kwargs["flash_attn_func"]


def test_from_config(published, device, monkeypatch):
    """from_config(config, attn_implementation=<repo>) resolves the kernel too, and trains through it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"), attn_implementation=published.repo_id,
                                             dtype=torch.bfloat16).to(device)
    assert model.config._attn_implementation == published.repo_id
    spy = KernelCallSpy(monkeypatch)
    ids = random_ids(2, SEQLEN, device, seed=7)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert spy.calls == {"flash_attn_func": model.config.num_hidden_layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_varlen_forward_backward(published, model_dirs, device, arch, monkeypatch):
    """A padding mask: transformers unpads and calls flash_attn_varlen_func; real tokens match the reference."""
    import torch

    trio = Trio(model_dirs[arch], published.repo_id, arch, device)
    spy = KernelCallSpy(monkeypatch)
    ids = random_ids(3, SEQLEN, device, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, SEQLEN - 5:] = 0  # right padding
    keep = mask.bool()

    def step(model):
        logits = model(ids, attention_mask=mask).logits
        return logits[keep], padded_loss(logits, ids, mask)

    check_bounds(trio.run(step), f"{arch} padded")
    assert spy.calls == {"flash_attn_varlen_func": trio.kernel.config.num_hidden_layers}
    assert expected_kwargs(arch) | {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"} \
        <= spy.kwargs["flash_attn_varlen_func"]


def padded_loss(logits, ids, mask):
    """Next-token loss over real tokens predicting real tokens.

    transformers' own loss (labels = -100 at pads) keeps the last left pad predicting the first
    real token; what a pad row holds is undefined (eager attends uniformly, flash leaves zeros),
    so that term would compare two arbitrary values.
    """
    import torch.nn.functional as F

    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    return F.cross_entropy(logits[:, :-1][pairs].float(), ids[:, 1:][pairs])


def packed_loss(logits, ids, lengths):
    """Next-token loss inside each packed document (no prediction across a document boundary)."""
    import torch
    import torch.nn.functional as F

    losses, start = [], 0
    for n in lengths:
        losses.append(F.cross_entropy(logits[start:start + n - 1].float(), ids[start + 1:start + n],
                                      reduction="sum"))
        start += n
    return torch.stack(losses).sum() / (sum(lengths) - len(lengths))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_varlen_forward_backward(published, model_dirs, device, arch, monkeypatch):
    """Documents packed in one row, told apart by position_ids (padding-free training): the kernel
    model takes flash_attn_varlen_func and matches the reference run on each document on its own."""
    import torch

    trio = Trio(model_dirs[arch], published.repo_id, arch, device)
    spy = KernelCallSpy(monkeypatch)
    ids = random_ids(1, sum(PACKED_LENGTHS), device, seed=3)[0]
    position_ids = torch.cat([torch.arange(n) for n in PACKED_LENGTHS]).to(device)
    docs = ids.split(list(PACKED_LENGTHS))

    def step(model):
        if model is trio.kernel:
            logits = model(ids[None], position_ids=position_ids[None]).logits[0]
        else:  # the reference has no packing: one document at a time
            logits = torch.cat([model(d[None]).logits[0] for d in docs])
        return logits, packed_loss(logits, ids, PACKED_LENGTHS)

    check_bounds(trio.run(step), f"{arch} packed")
    assert spy.calls == {"flash_attn_varlen_func": trio.kernel.config.num_hidden_layers}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache(published, model_dirs, device, arch, padded, monkeypatch):
    """generate() with transformers' KV cache: the prompt and each decode step go through
    flash_attn_func (no padding) or flash_attn_varlen_func (padding mask); the step logits match
    the reference model's full forward over the generated sequence (no cache)."""
    import torch

    trio = Trio(model_dirs[arch], published.repo_id, arch, device)
    spy = KernelCallSpy(monkeypatch)
    prompt_len, new = 10, 8  # 18 tokens: past the sliding window of 8
    ids = random_ids(2, prompt_len, device, seed=4)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    with torch.no_grad():
        gen = trio.kernel.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, output_logits=True, return_dict_in_generate=True)
        step_logits = torch.stack(gen.logits, dim=1).float()  # (batch, new, vocab)
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype, device=device)], dim=1)
        # the cache run sees position ids counted over real tokens only; give the reference the same
        position_ids = (full_mask.cumsum(-1) - 1).clamp_min(0)
        ref = {}
        for name in ("ref32", "ref16"):
            logits = getattr(trio, name)(gen.sequences[:, :-1], attention_mask=full_mask[:, :-1],
                                         position_ids=position_ids[:, :-1]).logits
            ref[name] = logits[:, prompt_len - 1:].float()
    fig = {"out": rel_err(step_logits, ref["ref32"]), "out_lowp": rel_err(ref["ref16"], ref["ref32"])}
    print(f"{arch} generate {'padded' if padded else 'unpadded'}: {fig}")
    assert fig["out"] <= 2 * fig["out_lowp"] + ABS_FLOOR, fig
    n_layers = trio.kernel.config.num_hidden_layers
    assert sum(spy.calls.values()) == n_layers * new, "one call per layer for the prompt and each decode step"
    if padded:
        # a sliding layer's cache drops the pads once they leave the window: its mask goes, and so
        # do the varlen calls (flash_attn_func then)
        assert spy.calls["flash_attn_varlen_func"] >= n_layers, dict(spy.calls)
    else:
        assert set(spy.calls) == {"flash_attn_func"}, dict(spy.calls)


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
@pytest.mark.parametrize("name", ["repo", "flash-attn2 alias"])
def test_continuous_batching(published, model_dirs, device, arch, name, monkeypatch):
    """generate_batch (continuous batching, paged KV cache) with attn_implementation="paged|<repo>".

    The paged cache is read by flash_attn_varlen_func; on CUDA, for a repo named like flash-attn 2
    (the alias) and a model without sliding layers (Llama), transformers' decode fast path calls
    flash_attn_with_kvcache with a block table.
    Each greedy token must be the reference model's argmax up to the bfloat16 logit error.
    """
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    repo = published.repo_id if name == "repo" else alias_repo(published.repo_id) + "@v1"
    model = load(model_dirs[arch], f"paged|{repo}", "bfloat16", device)
    ref_impl = REFERENCE_IMPL.get(arch, "sdpa")
    ref32 = load(model_dirs[arch], ref_impl, "float32", device)
    ref16 = load(model_dirs[arch], ref_impl, "bfloat16", device)
    spy = KernelCallSpy(monkeypatch)
    prompts = [random_ids(1, n, device, seed=5 + n)[0].tolist() for n in (5, 11, 3)]
    new = 8
    gen_config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=-1,
                                  pad_token_id=0)
    cb_config = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64, use_cuda_graph=False,
                                         use_async_batching=False)
    outputs = model.generate_batch(prompts, generation_config=gen_config, continuous_batching_config=cb_config)
    assert len(outputs) == len(prompts)
    with torch.no_grad():
        for out in outputs.values():
            assert out.error is None and len(out.generated_tokens) == new, out
            seq = torch.tensor([out.prompt_ids + out.generated_tokens[:-1]], device=device)
            l32 = ref32(seq).logits[0, len(out.prompt_ids) - 1:].float()
            l16 = ref16(seq).logits[0, len(out.prompt_ids) - 1:].float()
            chosen = torch.tensor(out.generated_tokens, device=device)[:, None]
            gap = l32.max(-1).values - l32.gather(-1, chosen)[:, 0]  # 0 where the kernel picked the argmax
            tolerance = 2 * (l16 - l32).abs().max() + ABS_FLOOR
            assert (gap <= tolerance).all(), f"greedy tokens off the reference argmax: gaps {gap.tolist()}"
    # the fast path needs CUDA, a flash-attn-2-like name and block-table support in every layer
    # type (transformers' sliding-window cache has none: not for GPT-OSS)
    fast_path = device == "cuda" and name != "repo" and arch == "llama"
    assert spy.calls["flash_attn_varlen_func"] > 0
    assert (spy.calls["flash_attn_with_kvcache"] > 0) == fast_path, dict(spy.calls)


def test_bound_rejects_a_wrong_attention(published, model_dirs, device):
    """The bound is tight enough to catch a kernel that ignored the softcap and the window: gemma2
    with our kernel must fail it against references loaded without softcap and sliding window."""
    trio = Trio(model_dirs["gemma2"], published.repo_id, "gemma2", device)
    for name in ("ref32", "ref16"):
        plain = load(model_dirs["gemma2"], "eager", "float32" if name == "ref32" else "bfloat16", device,
                     attn_logit_softcapping=None, layer_types=["full_attention", "full_attention"])
        setattr(trio, name, plain)
    ids = random_ids(2, SEQLEN, device, seed=6)

    def step(model):
        out = model(ids, labels=ids)
        return out.logits, out.loss

    with pytest.raises(AssertionError, match="output error"):
        check_bounds(trio.run(step), "gemma2 against a reference without softcap and window")


def test_example_load_with_kernel(published):
    """examples/load_with_kernel.py runs as docs/transformers-trl.md shows (LOCAL_KERNELS set)."""
    import subprocess
    import sys

    from hf_support import ROOT

    for arch in ("llama", "gpt_oss"):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "load_with_kernel.py"), "--arch", arch,
                               "--repo-id", published.repo_id], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"attn_implementation={published.repo_id!r}" in proc.stdout, proc.stdout
