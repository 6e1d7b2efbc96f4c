"""A fixed piece of the demo's work, for comparing CPUs and kernel sets: 20 SGD steps of the
embedded default's student (ConvNet, 1x28x28, batch 256, 128-d MSE targets) and the features
of 3 x 1024 images. Run it as is and with PyTorch's kernels limited to AVX2 (see
bench/isa_ratio.sh); the ratio of the two times says how much of a slower CPU is its ISA."""

import time

import torch
import torch.nn.functional as F

from ddkd.models.convnet import ConvNet, ConvNetConfig

torch.manual_seed(0)
net = ConvNet(ConvNetConfig(in_channels=1, image_size=28, out_dim=128))
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(256, 1, 28, 28), torch.randn(256, 128)
start = time.perf_counter()
for _ in range(20):
    loss = F.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
train = time.perf_counter() - start
net.eval()
start = time.perf_counter()
with torch.no_grad():
    for _ in range(3):
        net.features(torch.randn(1024, 1, 28, 28))
print(f"train {train:.2f} s  features {time.perf_counter() - start:.2f} s  "
      f"capability {torch.backends.cpu.get_cpu_capability()}")
