import json

import pytest
import torch

from conftest import random_heads
from propd import PropdError
from propd.models.config import ModelConfig
from propd.models.heads import MedusaHeads

CFG = ModelConfig.tiny()


@pytest.mark.parametrize("own", [False, True])
def test_checkpoint_roundtrip(tmp_path, own):
    lm = torch.nn.Linear(CFG.hidden_size, CFG.vocab_size, bias=False)
    heads = random_heads(CFG, 3, own=own, lm_head=lm)
    heads.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["medusa_num_heads"] == 3
    back = MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size, lm_head=lm)
    assert back.num_heads == 3 and back.own_lm_head == own
    x = torch.randn(2, CFG.hidden_size)
    torch.testing.assert_close(back(x), heads(x))
    assert heads(x).shape == (2, 3, CFG.vocab_size)


def test_medusa_pt_format_and_tensors_win_over_config(tmp_path):
    heads = random_heads(CFG, 2, own=True)
    torch.save(heads.heads.state_dict(), tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    with pytest.warns(UserWarning, match="using 2"):
        back = MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size)
    assert back.num_heads == 2
    x = torch.randn(1, CFG.hidden_size)
    torch.testing.assert_close(back(x), heads(x))


def test_mismatched_heads_are_refused(tmp_path):
    random_heads(ModelConfig.tiny(hidden_size=32, head_dim=8), 2).save(tmp_path / "h32")
    with pytest.raises(PropdError, match="hidden size 32"):
        MedusaHeads.load(tmp_path / "h32", CFG.hidden_size, CFG.vocab_size)
    random_heads(ModelConfig.tiny(vocab_size=99), 2, own=True).save(tmp_path / "v99")
    with pytest.raises(PropdError, match="vocabulary of 99"):
        MedusaHeads.load(tmp_path / "v99", CFG.hidden_size, CFG.vocab_size)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(PropdError, match="does not exist"):
        MedusaHeads.load(tmp_path / "nope", 64, 128)
    with pytest.raises(PropdError, match="no Medusa heads"):
        MedusaHeads.load(tmp_path, 64, 128)
    from safetensors.torch import save_file

    save_file({"model.layers.0.weight": torch.zeros(2)}, str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(PropdError, match="not a Medusa"):
        MedusaHeads.load(tmp_path, 64, 128)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 300])
def test_linear_equals_f_linear_for_every_row_count(rows, bias):
    from propd.models.cpu_modules import KernelLinear as Linear

    torch.manual_seed(rows)
    proj = Linear(32, 500, bias=bias)
    x = torch.randn(rows, 3, 32)[:, 1]  # a non-contiguous input
    want = torch.nn.functional.linear(x, proj.weight, proj.bias)
    got = proj(x)
    assert got.shape == want.shape == (rows, 500)
    assert got.is_contiguous()  # row-major like F.linear's: attention's fused CPU kernel needs contiguous heads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_linear_kernel_choice_is_float32_cpu_with_1_to_256_rows():
    from propd.models.cpu_modules import KernelLinear as Linear

    proj = Linear(32, 50)
    assert proj.skinny(torch.randn(8, 32)) and proj.skinny(torch.randn(2, 4, 32))  # 8 rows either way
    assert proj.skinny(torch.randn(1, 32)) and proj.skinny(torch.randn(1, 1, 32))  # one row: padded to two
    assert not proj.skinny(torch.randn(300, 32))  # many rows: F.linear is as fast
    assert not proj.skinny(torch.randn(8, 32, dtype=torch.bfloat16))  # bf16: F.linear was never slower
    got = proj.to(torch.bfloat16)(torch.randn(8, 32, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == (8, 50) and got.is_contiguous()


def test_medusa_heads_share_one_projection_call():
    from propd.models.cpu_modules import KernelLinear as Linear

    calls = []
    lm_head = Linear(16, 40, bias=False)
    lm_head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    heads = MedusaHeads(16, 40, num_heads=3, shared_lm_head=lm_head)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16)
    out = heads(x)
    assert out.shape == (2, 3, 40) and calls == [(2, 3, 16)]  # one call for all heads: weights read once
    for i, head in enumerate(heads.heads):  # the same as projecting each head on its own
        torch.testing.assert_close(out[:, i], torch.nn.functional.linear(head(x), lm_head.weight))


def test_draft_vocab_topk_is_the_full_topk_restricted_to_its_tokens():
    lm = torch.nn.Linear(CFG.hidden_size, CFG.vocab_size, bias=False)
    heads = random_heads(CFG, 3, lm_head=lm)
    x = torch.randn(2, CFG.hidden_size)
    full = heads(x)  # (2, 3, V)
    torch.testing.assert_close(heads.topk(x, 5), full.topk(5, dim=-1).indices)  # no draft vocabulary
    ids = torch.randperm(CFG.vocab_size, generator=torch.Generator().manual_seed(0))[:40]
    heads.set_draft_vocab(ids)
    got = heads.topk(x, 5)
    want = ids[full[..., ids].topk(5, dim=-1).indices]
    assert torch.equal(got, want) and torch.isin(got, ids).all()
    more = heads.topk(x, 100)  # more ranks than tokens: the last token is repeated
    assert torch.equal(more[..., :40].sort(-1).values, ids.sort().values.expand(2, 3, 40))
    assert (more[..., 40:] == more[..., 39:40]).all()
    with torch.no_grad():
        lm.weight.mul_(-1)  # the gathered rows follow a change of the shared projection
    torch.testing.assert_close(heads.topk(x, 5), ids[heads(x)[..., ids].topk(5, dim=-1).indices])
    heads.set_draft_vocab(None)
    torch.testing.assert_close(heads.topk(x, 5), heads(x).topk(5, dim=-1).indices)


def test_draft_vocab_file_roundtrip_and_errors(tmp_path):
    from propd.models.heads import read_draft_vocab, write_draft_vocab

    lm = torch.nn.Linear(CFG.hidden_size, CFG.vocab_size, bias=False)
    random_heads(CFG, 2, lm_head=lm).save(tmp_path)
    plain = MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size, lm_head=lm)
    assert plain.draft_ids is None and plain.draft_size() == plain.draft_size(0) == 0
    with pytest.raises(PropdError, match="no draft_vocab.json"):
        plain.draft_size(3)
    write_draft_vocab(tmp_path, [[5, 7, 7, 9], [9, 9, 1]], CFG.vocab_size, source="test", then=[[2, 9, 3, 3, 3]])
    assert read_draft_vocab(tmp_path, CFG.vocab_size) == [9, 7, 1, 5, 3, 2]  # answers by count (ties by id), then
    heads = MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size, lm_head=lm)  # the rest of the prompts
    assert heads.draft_ids.tolist() == [9, 7, 1, 5, 3, 2] and heads.draft_size() == 6 and heads.draft_size(2) == 2
    x = torch.randn(3, CFG.hidden_size)
    assert set(heads.topk(x, 4, draft_vocab=2).flatten().tolist()) == {9, 7}
    assert heads.topk(x, 8, draft_vocab=0).shape == (3, 2, 8)  # 0: the whole vocabulary
    with pytest.raises(PropdError, match="lists 6"):
        heads.draft_size(7)
    with pytest.raises(PropdError, match="0 .whole vocabulary. or positive"):
        heads.draft_size(-1)
    (tmp_path / "draft_vocab.json").write_text(json.dumps({"ids": [1, CFG.vocab_size]}))
    with pytest.raises(PropdError, match="outside this model's vocabulary"):
        MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size, lm_head=lm)
    (tmp_path / "draft_vocab.json").write_text("[1, 2]")
    with pytest.raises(PropdError, match="not a draft vocabulary"):
        MedusaHeads.load(tmp_path, CFG.hidden_size, CFG.vocab_size, lm_head=lm)
    with pytest.raises(PropdError, match="twice"):
        random_heads(CFG, 2, lm_head=lm).set_draft_vocab([3, 3])


@pytest.mark.parametrize("layers", [1, 2])
def test_heads_first_resblocks_run_as_one_product_with_the_same_result(layers):
    cfg = ModelConfig.tiny()
    torch.manual_seed(3)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, 3, layers, shared_lm_head=torch.nn.Linear(64, 128, bias=False))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        fused = heads._blocks(x)
        assert heads._first_blocks() is not None  # the stacked product served this call
        each = torch.stack([head(x) for head in heads.heads], dim=-2)
        torch.testing.assert_close(fused, each, rtol=1e-5, atol=1e-5)
        heads.heads[1][0].linear.weight.mul_(2)  # changed in place: the stacked copy is rebuilt
        torch.testing.assert_close(heads._blocks(x), torch.stack([head(x) for head in heads.heads], dim=-2),
                                   rtol=1e-5, atol=1e-5)
    heads._blocks(x).sum().backward()  # with gradients on (training), the per-head modules run and learn
    assert all(head[0].linear.weight.grad is not None for head in heads.heads)
