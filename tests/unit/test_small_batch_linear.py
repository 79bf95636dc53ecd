"""The small-batch CPU linear computes what nn.Linear computes, and the split model's copies share the
model's weights while leaving the model (what hf_ar runs) as it was."""
import pytest
import torch
from tiny_model import tiny_llama
from torch import nn

from selfspec.drafter import DrafterHead, HeadConfig
from selfspec.small_batch_linear import ALL_ROWS, SMALL_BATCH, SmallBatchLinear, small_batch_copy
from selfspec.split import SplitModel
from selfspec.pass_costs import CALIBRATED_ROWS, measure_pass_costs, measure_thin_rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (1, 3, 48), (2, 5, 48), (SMALL_BATCH + 1, 48)])
def test_outputs_and_gradients_match_nn_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias).double()
    fast = small_batch_copy(plain)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = plain(x)
    got = fast(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *plain.parameters()], grad_out)
    got_grads = torch.autograd.grad(got, [x, *fast.parameters()], grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_copy_shares_weights_and_leaves_the_original_alone():
    model = tiny_llama(seed=3)
    split = SplitModel(model, 2)
    original = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert original and all(type(m) is nn.Linear for m in original)
    copies = [m for m in split.layers.modules() if isinstance(m, nn.Linear)] + [split.lm_head]
    assert all(type(m) is SmallBatchLinear for m in copies)
    model_params = {p.data_ptr() for p in model.parameters()}
    assert all(m.weight.data_ptr() in model_params for m in copies)
    with torch.no_grad():  # a weight changed through the model is seen by the split: one set of weights
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    assert torch.equal(split.layers[0].mlp.down_proj.weight, model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("thin", [True, False])
@pytest.mark.parametrize("lean", [True, False])
def test_split_logits_match_the_model_forward(lean, thin):
    model = tiny_llama(seed=4)
    split = SplitModel(model, 2, lean=lean)
    assert (split.lean is not None) == lean  # the tiny Llama is a plain Llama: lean layers serve it
    split.use_thin_gemm_for(ALL_ROWS if thin else ())  # either kernel, whatever the split chose
    ids = torch.arange(3, 15)
    with torch.no_grad():
        want = model(ids[None]).logits[0]
        cache = split.new_cache(32)
        prefix = split.verify(split.trunk(ids[:9], 0, cache), 0, cache)
        one = split.verify(split.trunk(ids[9:10], 9, cache), 9, cache)
        block = split.verify(split.trunk(ids[10:], 10, cache), 10, cache)
    torch.testing.assert_close(torch.cat([prefix, one, block]), want.float(), rtol=1e-5, atol=1e-5)


def test_the_measured_kernel_choice_reaches_every_linear_of_the_split_and_its_head():
    model = tiny_llama(seed=6)
    split = SplitModel(model, 2)
    chosen = set(split.thin_rows)
    rows = measure_thin_rows(split)
    assert split.thin_rows == chosen  # measuring again leaves the split's choice as it was
    assert rows <= ALL_ROWS
    # above the measured row counts the choice made at the largest one holds
    assert (CALIBRATED_ROWS + 1 in rows) == (CALIBRATED_ROWS in rows) == (SMALL_BATCH in rows)
    head = DrafterHead(split, HeadConfig(adapter_hidden=16, lora_rank=2, attention_layers=1,
                                         context_window=4, draft_vocab=64))
    linears = [m for part in (split.layers, split.lm_head, head) for m in part.modules()
               if isinstance(m, SmallBatchLinear)]
    assert len(linears) >= 7 * 4 + 1 + 2 + 7  # the split's layers and lm_head, the head's adapter and layer
    assert all(m.thin_rows is split.thin_rows for m in linears)
    assert all(layer.thin_rows is split.thin_rows for layer in split.lean)
    x = torch.randn(1, 3, 64, dtype=torch.float64)
    split.use_thin_gemm_for(())  # F.linear itself, bit for bit, once the thin GEMM is not chosen
    assert torch.equal(split.lm_head(x), torch.nn.functional.linear(x, split.lm_head.weight))


def test_measuring_on_the_machine_leaves_the_global_random_state_alone():
    """Seeded sampling and training must not depend on whether this process has measured yet."""
    model = tiny_llama(seed=7, layers=3)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    split = SplitModel(model, 1)
    measure_thin_rows(split)
    measure_pass_costs(split, None, max_drafts=2, context=16, reps=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_lean_layers_in_bfloat16_compute_what_the_hf_layers_compute():
    """bf16 is the GPU dtype: lean layers must keep HF's casts (float32 norm statistics, rotary in the
    input dtype) so that the two paths agree to bf16 rounding, and both track the model's forward."""
    model = tiny_llama(seed=5).to(torch.bfloat16)
    ids = torch.arange(3, 15)
    logits = {}
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
        for lean in (True, False):
            split = SplitModel(model, 2, lean=lean)
            assert split.dtype == torch.bfloat16 and (split.lean is not None) == lean
            cache = split.new_cache(32)
            logits[lean] = torch.cat([split.verify(split.trunk(ids[:9], 0, cache), 0, cache),
                                      split.verify(split.trunk(ids[9:10], 9, cache), 9, cache),
                                      split.verify(split.trunk(ids[10:], 10, cache), 10, cache)])
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-6)
    # the model's own forward may round elsewhere (one pass, F.linear); measured equal on the 2-core CPU
    assert (logits[True] - want).abs().max() < 0.01 * want.abs().max()
    assert (logits[True].argmax(-1) == want.argmax(-1)).float().mean() > 0.9
