"""SBDS loss terms against hand-computed values; KL properties; bad inputs."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from spikemar.distill import FeatureProjection, SBDSLoss, kl_divergence, sbds_loss


def test_kl_matches_a_hand_computed_value():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, abs=1e-6)
    # for this mirrored pair both directions are ¼·ln 2; the pair below is asymmetric
    assert kl_divergence(q.log(), p.log()).item() == pytest.approx(expected, abs=1e-6)
    r = torch.tensor([0.7, 0.2, 0.1])
    assert kl_divergence(p.log(), r.log()) != pytest.approx(kl_divergence(r.log(), p.log()))
    forward = (p * (p / r).log()).sum().item()
    reverse = (r * (r / p).log()).sum().item()
    assert kl_divergence(p.log(), r.log()).item() == pytest.approx(forward, abs=1e-6)
    assert kl_divergence(r.log(), p.log()).item() == pytest.approx(reverse, abs=1e-6)


@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 10))
def test_kl_is_zero_for_equal_and_non_negative_otherwise(seed, scale):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 7, 11, generator=g) * scale
    b = torch.randn(4, 7, 11, generator=g) * scale
    assert kl_divergence(a, a).abs().max() < 1e-5
    assert kl_divergence(a + 3.0, a).abs().max() < 1e-5  # logits are shift-invariant
    assert (kl_divergence(a, b) >= -1e-6).all()


def test_sbds_combines_the_terms_with_the_papers_normalisation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    hs = [torch.randn(2, 5, 4) for _ in range(3)]
    ht = [torch.randn(2, 5, 4) for _ in range(3)]
    T, M, layers = 4, 5, 3
    fkl = kl_divergence(t, s).sum(-1).mean()
    rkl = kl_divergence(s, t).sum(-1).mean()
    feat = sum((b - a).norm(dim=-1).mean() for a, b in zip(hs, ht, strict=True))
    expected = (0.2 * fkl + 0.7 * rkl) / (T * M) + feat / (T * layers)
    terms = sbds_loss(s, t, hs, ht, T=T)
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.forward_kl.item() == pytest.approx(fkl.item(), rel=1e-6)
    assert terms.reverse_kl.item() == pytest.approx(rkl.item(), rel=1e-6)


def test_every_term_switches_off_for_the_ablations():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    hs, ht = [torch.randn(2, 3, 4)], [torch.randn(2, 3, 4)]
    only_forward = sbds_loss(s, t, T=1, alpha=1.0, beta=0.0, feature=None).loss
    assert only_forward.item() == pytest.approx(kl_divergence(t, s).sum(-1).mean().item() / 3)
    only_feature = sbds_loss(s, t, hs, ht, alpha=0.0, beta=0.0).loss
    assert only_feature.item() == pytest.approx((ht[0] - hs[0]).norm(dim=-1).mean().item())
    weighted = sbds_loss(s, t, hs, ht, alpha=0.0, beta=0.0, gamma=0.25).loss
    assert weighted.item() == pytest.approx(0.25 * only_feature.item())
    assert sbds_loss(t, t, ht, ht).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_temperature_softens_and_rescales():
    s, t = torch.tensor([[[2.0, 0.0, -1.0]]]), torch.tensor([[[0.0, 1.0, 0.0]]])
    terms = sbds_loss(s, t, T=1, alpha=1.0, beta=0.0, feature=None, temperature=2.0)
    assert terms.loss.item() == pytest.approx(4 * kl_divergence(t / 2, s / 2).item(), rel=1e-6)


def test_projection_maps_student_widths_to_the_teachers_and_learns():
    proj = FeatureProjection([4, 6], [8, 6])
    assert isinstance(proj.maps[1], torch.nn.Identity)
    hs = [torch.randn(2, 3, 4), torch.randn(2, 3, 6)]
    ht = [torch.randn(2, 3, 8), torch.randn(2, 3, 6)]
    loss = SBDSLoss(T=2, projection=proj)(torch.randn(2, 3, 5), torch.randn(2, 3, 5), hs, ht)
    loss.loss.backward()
    assert proj.maps[0].weight.grad is not None


def test_the_module_is_the_function_with_its_settings():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    hs, ht = [torch.randn(2, 3, 4)] * 2, [torch.randn(2, 3, 4)] * 2
    settings = {"T": 3, "alpha": 0.5, "beta": 0.1, "temperature": 2.0, "gamma": 0.3}
    got, want = SBDSLoss(**settings)(s, t, hs, ht), sbds_loss(s, t, hs, ht, **settings)
    assert got.loss.item() == want.loss.item()
    assert SBDSLoss()(s, t, hs, ht).loss.item() == sbds_loss(s, t, hs, ht).loss.item()
    assert SBDSLoss(feature=None)(s, t).loss.item() == sbds_loss(s, t, feature=None).loss.item()
    with pytest.raises(TypeError, match=r"SBDSLoss: unknown settings \['tau'\]"):
        SBDSLoss(tau=2.0)
    with pytest.raises(TypeError, match=r"unknown settings \['student_logits'\]"):
        SBDSLoss(student_logits=s)


def test_gradients_reach_the_student_not_the_teacher_copy():
    s = torch.randn(2, 3, 5, requires_grad=True)
    t = torch.randn(2, 3, 5)
    sbds_loss(s, t, feature=None).loss.backward()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher_logits": torch.randn(2, 3, 6)}, "vocabulary"),
        ({"T": 0}, "T"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": float("nan")}, "beta"),
        ({"temperature": float("inf")}, "temperature"),
        ({"gamma": "1"}, "gamma"),
        ({"feature": "mid"}, "feature"),
        ({"student_hidden": [torch.randn(2, 3, 4)]}, "hidden"),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    hidden = [torch.randn(2, 3, 4)] * 2
    args = {"student_logits": torch.randn(2, 3, 5), "teacher_logits": torch.randn(2, 3, 5),
            "student_hidden": hidden, "teacher_hidden": hidden}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sbds_loss(**args)
