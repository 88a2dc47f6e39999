"""What bf16 costs PyTorch itself: the yardstick for the bf16 row of `trainer parity`.

Runs one forward and backward of a randomly initialised torchvision ResNet-18 (training-mode
BatchNorm, fc removed) in f32 and under bf16 autocast from the same weights and inputs (16 images,
64 px, uniform in [-2, 2], as in `trainer parity`), and prints the relative L2 errors of the pooled
output and the worst parameter gradient, in the parity row's words.

Usage: python tools/bf16_torch_reference.py [--device cpu|cuda]
"""
import argparse, copy
import torch, torchvision

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
a = p.parse_args()
torch.manual_seed(0)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
net = torchvision.models.resnet18()
net.fc = torch.nn.Identity()
x = (torch.rand(16, 3, 64, 64) * 4 - 2).to(a.device)


def run(bf16):
    m = copy.deepcopy(net).to(a.device).train()
    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=bf16):
        y = m(x)
    y = y.float()
    # A fixed weighting of the outputs makes the gradients non-trivial.
    probe = torch.linspace(-1, 1, y.numel(), device=a.device).reshape(y.shape)
    (y * probe).sum().backward()
    return y.detach(), {n: q.grad.detach().float() for n, q in m.named_parameters()}


y32, g32 = run(False)
y16, g16 = run(True)
rel = lambda u, v: ((u - v).norm() / v.norm()).item()
worst = max((rel(g16[n], g32[n]), n) for n in g32)
print(f"output {rel(y16, y32):.2e}  gradients {worst[0]:.2e} (worst {worst[1]})")
