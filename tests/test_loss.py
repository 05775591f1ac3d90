import math

import torch
import torch.nn.functional as F

from csmcir.losses import InfoNCELoss, info_nce, same_target_mask


def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def test_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    q, t = _unit(3, 4), _unit(3, 4)
    scale = torch.tensor(math.log(10.0))
    s = 10.0 * q @ t.T
    expected = -(s.diag() - s.logsumexp(dim=1)).mean()
    torch.testing.assert_close(info_nce(q, t, scale), expected)


def test_false_negatives_leave_the_denominator():
    torch.manual_seed(0)
    q, t = _unit(3, 4), _unit(3, 4)
    # query 0 accepts targets 0 and 1 (several correct targets): target 1 is no negative for it
    mask = same_target_mask(torch.tensor([10, 11, 12]), torch.tensor([[10, 11], [11, -1], [12, -1]]))
    assert mask.tolist() == [[True, True, False], [False, True, False], [False, False, True]]
    scale = torch.tensor(0.0)
    s = q @ t.T
    row0 = -(s[0, 0] - torch.logsumexp(s[0, [0, 2]], 0))
    rest = -(s.diag()[1:] - s[1:].logsumexp(dim=1))
    expected = (row0 + rest.sum()) / 3
    torch.testing.assert_close(info_nce(q, t, scale, mask), expected)


def test_same_image_twice_in_batch_is_masked():
    mask = same_target_mask(torch.tensor([5, 5]), torch.tensor([[5], [5]]))
    assert mask.all()
    q = _unit(2, 4)
    loss = info_nce(q, q.clone(), torch.tensor(0.0), mask)
    # each query sees only its own positive: loss exactly 0
    torch.testing.assert_close(loss, torch.tensor(0.0))


def test_gathered_targets_with_offset_equal_full_batch_loss():
    """Rank r's loss over all ranks' targets equals the rows of the single-process loss."""
    torch.manual_seed(0)
    q, t = _unit(6, 8), _unit(6, 8)
    rows = torch.arange(6)
    all_t = rows[:, None]
    scale = torch.tensor(2.0)
    full = F.cross_entropy(scale.exp() * q @ t.T, rows, reduction="none")
    for rank in range(2):
        sl = slice(3 * rank, 3 * rank + 3)
        local = info_nce(q[sl], t, scale, same_target_mask(rows, all_t[sl]), query_offset=3 * rank)
        torch.testing.assert_close(local, full[sl].mean())


def test_learnable_temperature_gets_gradient_and_is_clamped():
    loss_fn = InfoNCELoss(init_temperature=0.07)
    q, t = _unit(4, 8), _unit(4, 8)
    loss_fn(q, t).backward()
    assert loss_fn.logit_scale.grad is not None
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)
    assert abs(loss_fn.temperature - 0.01) < 1e-6  # clamped at scale 100


def test_bidirectional_averages_both_directions():
    torch.manual_seed(0)
    q, t = _unit(4, 8), _unit(4, 8)
    s = 3.0 * q @ t.T
    q2t = -(s.diag() - s.logsumexp(dim=1)).mean()
    t2q = -(s.diag() - s.logsumexp(dim=0)).mean()
    got = info_nce(q, t, torch.tensor(math.log(3.0)), bidirectional=True)
    torch.testing.assert_close(got, (q2t + t2q) / 2)


def test_bidirectional_masks_false_negatives_in_the_target_direction():
    torch.manual_seed(0)
    q, t = _unit(3, 4), _unit(3, 4)
    # query 0 accepts targets 0 and 1, so target 1 (query 1's positive) must not count query 0
    # as a negative; extra candidates after the positives (reference negatives) play no part
    # in the target-to-query direction
    extra = _unit(2, 4)
    cand = torch.cat([t, extra])
    mask = same_target_mask(torch.tensor([10, 11, 12, 20, 21]), torch.tensor([[10, 11], [11, -1], [12, -1]]))
    s = q @ cand.T
    q2t = torch.stack(
        [-(s[0, 0] - torch.logsumexp(s[0, [0, 2, 3, 4]], 0)), -(s[1, 1] - s[1].logsumexp(0)), -(s[2, 2] - s[2].logsumexp(0))]
    ).mean()
    st = s[:, :3].T  # [target, query]
    t2q = torch.stack(
        [-(st[0, 0] - st[0].logsumexp(0)), -(st[1, 1] - torch.logsumexp(st[1, [1, 2]], 0)), -(st[2, 2] - st[2].logsumexp(0))]
    ).mean()
    got = info_nce(q, cand, torch.tensor(0.0), mask, bidirectional=True)
    torch.testing.assert_close(got, (q2t + t2q) / 2)


def test_bidirectional_with_gathered_targets_uses_this_ranks_positives():
    """Under DDP the target-to-query direction pairs this rank's positives with its queries."""
    torch.manual_seed(0)
    q, t = _unit(6, 8), _unit(6, 8)
    rows = torch.arange(6)
    scale = torch.tensor(1.0)
    for rank in range(2):
        sl = slice(3 * rank, 3 * rank + 3)
        s = scale.exp() * q[sl] @ t.T
        q2t = F.cross_entropy(s, rows[sl])
        t2q = F.cross_entropy(s[:, sl].T, torch.arange(3))
        got = info_nce(q[sl], t, scale, same_target_mask(rows, rows[sl, None]), bidirectional=True, query_offset=3 * rank)
        torch.testing.assert_close(got, (q2t + t2q) / 2)
