"""MLM corruption and block-wise patch masking."""

import pytest
import torch

from cots.masking import block_mask, mlm_mask
from cots.tokenizers import WordTokenizer


@pytest.fixture
def tok():
    return WordTokenizer.from_corpus([" ".join(f"w{i}" for i in range(40))])


def _batch(tok, lengths, max_len=24):
    texts = [" ".join(f"w{j % 40}" for j in range(n)) for n in lengths]
    return tok.encode(texts, max_len)


def test_mlm_counts_and_specials(tok):
    ids, mask = _batch(tok, [0, 1, 5, 10, 22])
    masked, labels = mlm_mask(ids, mask, tok, prob=0.15, generator=torch.Generator().manual_seed(0))
    predicted = labels != -100
    # Rows of 0, 1, 5, 10, 22 words: BERT's max(1, round(0.15 n)).
    assert predicted.sum(1).tolist() == [0, 1, 1, 2, 3]
    assert torch.equal(labels[predicted], ids[predicted])
    specials = torch.isin(ids, torch.tensor(sorted(tok.special_ids))) | ~mask
    assert not (predicted & specials).any()
    assert torch.equal(masked[~predicted], ids[~predicted])


def test_mlm_80_10_10_and_determinism(tok):
    ids, mask = _batch(tok, [22] * 400)
    masked, labels = mlm_mask(ids, mask, tok, prob=0.5, generator=torch.Generator().manual_seed(1))
    predicted = labels != -100
    assert predicted.sum() == 400 * 11
    as_mask = (masked == tok.mask_id) & predicted
    kept = (masked == ids) & predicted
    other = predicted & ~as_mask & ~kept
    total = predicted.sum().item()
    assert abs(as_mask.sum().item() / total - 0.8) < 0.03
    # A random replacement may draw the original token (1 in 40 here) and count as kept.
    assert abs(kept.sum().item() / total - 0.1) < 0.02
    assert abs(other.sum().item() / total - 0.1) < 0.02
    assert not torch.isin(masked[other], torch.tensor(sorted(tok.special_ids))).any()
    again = mlm_mask(ids, mask, tok, prob=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    with pytest.raises(ValueError, match="prob"):
        mlm_mask(ids, mask, tok, prob=0.0)


@pytest.mark.parametrize("grid, ratio", [((14, 14), 0.4), ((8, 8), 0.4), ((8, 8), 0.75), ((4, 6), 0.5), ((8, 8), 0.0)])
def test_block_mask_exact_count(grid, ratio):
    masks = block_mask(32, grid, ratio, torch.Generator().manual_seed(2))
    assert masks.shape == (32, grid[0] * grid[1]) and masks.dtype == torch.bool
    assert (masks.sum(1) == round(ratio * grid[0] * grid[1])).all()


def test_block_mask_is_blockwise_and_deterministic():
    masks = block_mask(16, (14, 14), 0.4, torch.Generator().manual_seed(3))
    again = block_mask(16, (14, 14), 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)
    assert not torch.equal(masks, block_mask(16, (14, 14), 0.4, torch.Generator().manual_seed(4)))
    # Blocks: most masked patches have a masked right or lower neighbour, far more than the
    # 40% that independent random patches would have.
    grid = masks.reshape(16, 14, 14)
    right = grid[:, :, :-1] & grid[:, :, 1:]
    down = grid[:, :-1, :] & grid[:, 1:, :]
    has_neighbour = torch.zeros_like(grid)
    has_neighbour[:, :, :-1] |= right
    has_neighbour[:, :-1, :] |= down
    assert has_neighbour[grid].float().mean() > 0.7
    with pytest.raises(ValueError, match="ratio"):
        block_mask(1, (4, 4), 1.0)
