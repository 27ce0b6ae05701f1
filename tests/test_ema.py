import torch
from torch import nn

from imgen_cli.nn.family import FamilyNetwork
from imgen_cli.train.ema import EMA


class _Net(FamilyNetwork):
    ema_copied = ("codebook",)

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.codebook = nn.Parameter(torch.zeros(3, 2))
        self.register_buffer("count", torch.zeros(()))


def test_ema_averages_weights_with_warmup_and_copies_state() -> None:
    net = _Net()
    ema = EMA(net, decay=0.9)
    before = ema.module.linear.weight.clone()
    with torch.no_grad():
        net.linear.weight.add_(1.0)
        net.codebook.fill_(5.0)
        net.count.fill_(7.0)
    ema.update(net)  # first update: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.linear.weight, 0.1 * before + 0.9 * net.linear.weight)
    assert torch.equal(ema.module.codebook, net.codebook)  # named in ema_copied: copied, not averaged
    assert ema.module.count == 7.0  # buffers are state: copied
    assert ema.current_decay() == min(0.9, 2 / 11)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_a_fine_tunes_average_keeps_its_trained_start_from_the_first_update() -> None:
    net = _Net()
    ema = EMA(net, decay=0.9, warmup=False)
    before = ema.module.linear.weight.clone()
    with torch.no_grad():
        net.linear.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.module.linear.weight, 0.9 * before + 0.1 * net.linear.weight)
    assert ema.current_decay() == 0.9
