"""The embedding-space defences' perturbations, as the papers define them: where they act,
their size relative to this model's embeddings, the masked positions, one update per batch."""
from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from robustkit_text import defences, embedding
from robustkit_text.defences import FGM, EmbeddingPGD, FreeLB, TextDefence, default_threat
from robustkit_text.embedding import frobenius, token_norm
from robustkit_text.model import TextClassifier, perturbed

from robustkit import LoadOptions, load_model
from robustkit.distributed import DistContext
from robustkit.harden.step import Optimization, StepContext

EPS = 1.0


@pytest.fixture()
def batch(fresh_model: Path) -> tuple[TextClassifier, torch.Tensor, torch.Tensor]:
    """A fresh tiny BERT in train mode and 8 reviews of different lengths (so some are padded)."""
    model = load_model(str(fresh_model), LoadOptions()).model
    assert isinstance(model, TextClassifier)
    texts = ["the film was good", "the plot was awful and the cast was dull really",
             "the story is lovely and the ending was great", "the movie was bad the script was poor",
             "the cast was superb", "the camera was boring and the pacing felt weak", "the ending was fine",
             "the dialogue was clumsy but the soundtrack was brilliant and the story was tedious"]
    return model.train(), model.encode(texts), torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])


def _context(model: TextClassifier) -> StepContext:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimization = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0))
    return StepContext(model=model, craft=model, threat=default_threat(EPS), device=torch.device("cpu"),
                       precision="fp32", generator=torch.Generator().manual_seed(0), optimization=optimization,
                       seed=0, world=DistContext(), train_size=8)


def _applied(defence: TextDefence, model: TextClassifier, ids: torch.Tensor, y: torch.Tensor,
             monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], int]:
    """The perturbations one training step adds to the word embeddings, in order, and the
    number of optimizer steps it took."""
    seen: list[torch.Tensor] = []

    def recording(layer: torch.nn.Module, delta: torch.Tensor) -> AbstractContextManager[None]:
        # the word embeddings: before position embeddings and LayerNorm
        assert layer is model.net.get_submodule("bert.embeddings.word_embeddings")
        seen.append(delta.detach().clone())
        return perturbed(layer, delta)

    monkeypatch.setattr(defences, "perturbed", recording)
    monkeypatch.setattr(embedding, "perturbed", recording)
    ctx = _context(model)
    defence.make_step(ctx)(ids, y)
    return seen, ctx.optimization.scheduler.last_epoch


def test_the_unit_is_the_mean_norm_of_the_real_tokens(batch: tuple) -> None:
    model, ids, _ = batch
    real = model.editable(ids)
    assert not bool(real[:, 0].any()) and not bool(real.all())  # [CLS] and padding are not real tokens
    expected = model.embedding.weight[ids[real]].norm(dim=-1).mean()
    assert torch.allclose(token_norm(model, ids), expected)


@pytest.mark.parametrize("defence", [FGM(), EmbeddingPGD(steps=3), FreeLB(steps=3)], ids=lambda d: d.name)
def test_perturbations_lie_in_the_ball_at_real_tokens_only(defence: TextDefence, batch: tuple,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids, y = batch
    radius = EPS * token_norm(model, ids)
    seen, updates = _applied(defence, model, ids, y, monkeypatch)
    assert updates == 1  # the parameter gradients of every pass feed one optimizer step
    assert len(seen) == {"fgm": 2, "pgd": 4, "freelb": 3}[defence.name]  # forward passes: 1+1, 1+(K-1)+1, K
    fixed = ~model.editable(ids)
    for delta in seen:
        assert bool((delta[fixed] == 0).all())  # padding, [CLS] and [SEP] untouched
        assert bool((frobenius(delta) <= radius * (1 + 1e-5)).all())
    if defence.name != "freelb":
        assert bool((seen[0] == 0).all())  # the clean pass
        assert torch.allclose(frobenius(seen[-1]).flatten(), radius.expand(len(ids)), rtol=1e-4)
    else:  # a random start of norm ~init_mag / sqrt(3) (uniform entries), growing along the ascent
        start = frobenius(seen[0]) / (defence.params.init_mag * token_norm(model, ids) / 3**0.5)
        assert bool(((start > 0.85) & (start < 1.15)).all())
        assert bool((frobenius(seen[-1]) > frobenius(seen[0])).all())


def test_fgm_is_the_normalised_clean_gradient(batch: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids, y = batch
    model.eval()  # no dropout, so the training pass's gradient is the one computed here
    zero = torch.zeros(*ids.shape, model.embedding.embedding_dim, requires_grad=True)
    with perturbed(model.embedding, zero):
        torch.nn.functional.cross_entropy(model(ids), y).backward()
    assert zero.grad is not None
    gradient = zero.grad * model.editable(ids).unsqueeze(-1)
    expected = EPS * token_norm(model, ids) * gradient / frobenius(gradient)
    seen, _ = _applied(FGM(), model, ids, y, monkeypatch)
    assert torch.allclose(seen[1], expected, atol=1e-6)


def test_the_radius_follows_the_scale_of_the_embeddings(batch: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """An absolute radius is negligible on large embeddings and swamps small ones: the same eps
    must perturb a model with 10x larger word embeddings by 10x as much."""
    model, ids, y = batch
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.embedding.weight.mul_(10)
    small, _ = _applied(FGM(), model, ids, y, monkeypatch)
    large, _ = _applied(FGM(), scaled, ids, y, monkeypatch)
    assert torch.allclose(frobenius(large[-1]), 10 * frobenius(small[-1]), rtol=1e-4)


def test_freelb_draws_one_set_of_dropout_masks_per_batch(batch: tuple) -> None:
    """As the reference's ``dp_masks``: the K passes of a batch see the same dropout masks (so
    the ascent climbs one loss surface), and the next batch draws new ones."""
    model, ids, y = batch
    masks: list[torch.Tensor] = []
    layer = model.net.get_submodule("bert.embeddings.dropout")  # its input (LayerNorm's output) is never exactly 0
    handle = layer.register_forward_hook(lambda _m, _i, output: masks.append(output == 0))
    try:
        step = FreeLB(steps=3).make_step(_context(model))
        step(ids, y)
        step(ids, y)
    finally:
        handle.remove()
    assert len(masks) == 6 and bool(masks[0].any())
    assert all(torch.equal(masks[0], m) for m in masks[1:3]) and all(torch.equal(masks[3], m) for m in masks[4:])
    assert not torch.equal(masks[0], masks[3])


def test_freelb_without_an_adversary_is_plain_training(batch: tuple) -> None:
    """With no random start and a negligible ascent, FreeLB-K averages K passes that share their
    dropout masks: the gradient of one plain pass, and the global generators (dropout's) end
    where one pass leaves them, whatever K, so the rest of the run's random stream is plain's."""
    model, ids, y = batch
    ends: list[torch.Tensor] = []
    grads: list[list[torch.Tensor]] = []
    for defence in (defences.Plain(), FreeLB(steps=3, init_mag=0.0, adv_lr=1e-9)):
        trained = copy.deepcopy(model)
        torch.manual_seed(1)
        defence.make_step(_context(trained))(ids, y)
        ends.append(torch.get_rng_state())
        grads.append([p.grad for p in trained.parameters() if p.grad is not None])
    assert torch.equal(ends[0], ends[1])
    assert len(grads[0]) == len(grads[1]) > 0
    for plain, freelb in zip(*grads):
        assert torch.allclose(plain, freelb, rtol=1e-4, atol=1e-7)
